// Build step: copy the service's .proto (the single source of truth, in the Python package) into
// this package and generate the TypeScript message and service types from it with
// @grpc/proto-loader's proto-loader-gen-types. Nothing here is written by hand or committed.
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const relative = "vla_inference/api/v1/vla_inference.proto";
const source = process.env.VLA_PROTO_SOURCE ?? join(root, "..", "..", "src", relative);
const protoDir = join(root, "proto");
const outDir = join(root, "src", "generated");

rmSync(protoDir, { recursive: true, force: true });
rmSync(outDir, { recursive: true, force: true });
mkdirSync(dirname(join(protoDir, relative)), { recursive: true });
copyFileSync(source, join(protoDir, relative));

// Keep these options equal to LOADER_OPTIONS in src/proto.ts: the types describe what the loader returns.
execFileSync(
  process.execPath,
  [
    join(root, "node_modules", "@grpc", "proto-loader", "build", "bin", "proto-loader-gen-types.js"),
    "--keepCase=false",
    "--longs=String",
    "--enums=String",
    "--defaults",
    "--oneofs",
    "--grpcLib=@grpc/grpc-js",
    "--includeDirs", protoDir,
    "--outDir", outDir,
    relative,
  ],
  { stdio: "inherit" },
);

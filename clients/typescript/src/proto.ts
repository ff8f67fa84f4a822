/**
 * Loads the VLAInference service definition from the .proto file copied into this package at
 * build time (scripts/generate.mjs). The TypeScript types in ./generated come from the same file.
 */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { join } from "node:path";

import type { ProtoGrpcType } from "./generated/vla_inference";

/** dist/src/proto.js -> the package root, where the build put proto/. */
export const PROTO_ROOT = join(__dirname, "..", "..", "proto");
export const PROTO_FILE = "vla_inference/api/v1/vla_inference.proto";

/** Must match the flags given to proto-loader-gen-types in scripts/generate.mjs. */
export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

let loaded: ProtoGrpcType | undefined;

export function loadProto(): ProtoGrpcType {
  if (loaded === undefined) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    loaded = grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType;
  }
  return loaded;
}

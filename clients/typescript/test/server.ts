/**
 * Test support: run the real Python server (`python -m vla_inference serve`) as a subprocess on a
 * port the OS picks (VLA_GRPC_PORT=0; the port is read from its start-up log), wait until it
 * reports SERVING, and stop it with SIGTERM afterwards.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";

import { VLAInferenceClient, type ClientOptions, type ModelInfo, type Observation } from "../src/index";

/** dist/test -> the repository root (clients/typescript/dist/test). */
export const REPO_ROOT = join(__dirname, "..", "..", "..", "..");
export const FIXTURES = join(__dirname, "..", "..", "test", "fixtures");

export function pythonExecutable(): string {
  const fromEnv = process.env.VLA_PYTHON;
  if (fromEnv) {
    return fromEnv;
  }
  const venv = join(REPO_ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

export interface RunningServer {
  port: number;
  target: string;
  log(): string;
  stop(): Promise<void>;
}

const LISTENING = /gRPC listening on \S+:(\d+)/;
const SERVING = /SERVING .* on port (\d+)/;

export async function startServer(env: Record<string, string> = {}, timeoutMs = 180_000): Promise<RunningServer> {
  const child: ChildProcess = spawn(pythonExecutable(), ["-m", "vla_inference", "serve"], {
    cwd: REPO_ROOT,
    env: {
      ...process.env,
      VLA_HOST: "127.0.0.1",
      VLA_GRPC_PORT: "0",
      VLA_METRICS_ENABLED: "false",
      VLA_EMBEDDED_MODEL: "metaworld",
      VLA_MODEL_PATH: "",
      VLA_WARMUP_BATCHES: "1",
      VLA_TORCH_THREADS: "1",
      VLA_SHUTDOWN_GRACE_S: "2",
      VLA_LOG_LEVEL: "INFO",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  let port = 0;
  const ready = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server not SERVING after ${timeoutMs} ms:\n${output}`)), timeoutMs);
    const onData = (data: Buffer): void => {
      output += data.toString();
      const listening = LISTENING.exec(output);
      if (listening && port === 0) {
        port = Number(listening[1]);
      }
      if (SERVING.test(output)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onData);
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code} before SERVING:\n${output}`));
    });
  });
  try {
    await ready;
  } catch (error) {
    child.kill("SIGKILL");
    throw error;
  }
  return {
    port,
    target: `127.0.0.1:${port}`,
    log: () => output,
    stop: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) {
          resolve();
          return;
        }
        const killer = setTimeout(() => child.kill("SIGKILL"), 15_000);
        child.once("exit", () => {
          clearTimeout(killer);
          resolve();
        });
        child.kill("SIGTERM");
      }),
  };
}

/** A valid observation for the served model, built from its ModelInfo (no hard-coded sizes). */
export function observationFor(info: ModelInfo, extra: Partial<Observation> = {}): Observation {
  const embodiment = info.defaultEmbodiment;
  const joints = info.stateDims[embodiment];
  if (joints === undefined) {
    throw new Error(`ModelInfo has no state_dims for ${embodiment}`);
  }
  const width = 32;
  const height = 24;
  const pixels = Buffer.alloc(width * height * 3);
  for (let i = 0; i < pixels.length; i++) {
    pixels[i] = (i * 7) % 251;
  }
  return {
    cameraImage: pixels,
    cameraImageEncoding: "IMAGE_ENCODING_RAW_RGB",
    cameraImageWidth: width,
    cameraImageHeight: height,
    jointPositions: Array.from({ length: joints }, (_, i) => 0.05 * (i + 1)),
    languageInstruction: "pick up the red cup",
    embodimentTag: embodiment,
    ...extra,
  };
}

export function connect(server: RunningServer, options: ClientOptions = {}): VLAInferenceClient {
  return new VLAInferenceClient(server.target, options);
}

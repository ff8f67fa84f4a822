/**
 * @vla-inference/client: a TypeScript client for the vla-inference gRPC server.
 *
 *   const client = new VLAInferenceClient("vla-inference:50051");
 *   const chunk = await client.predict({ cameraImage, jointPositions, languageInstruction, embodimentTag });
 *   for (const action of chunk.actions) await robot.executeAction(action.jointCommands);
 *
 * Message types are generated from the service's .proto file at build time.
 */
export {
  ControlSession,
  DEFAULT_MAX_MESSAGE_BYTES,
  DEFAULT_TIMEOUT_MS,
  VLAInferenceClient,
} from "./client";
export type { CallOptions, ClientOptions, TlsOptions } from "./client";
export { chunkError, Status, statusName, VLAError } from "./errors";
export { ImageEncoding } from "./generated/vla_inference/v1/ImageEncoding";

export type { Action, Action__Output } from "./generated/vla_inference/v1/Action";
export type { ActionChunk, ActionChunk__Output } from "./generated/vla_inference/v1/ActionChunk";
export type { CameraImage } from "./generated/vla_inference/v1/CameraImage";
export type { HealthStatus__Output } from "./generated/vla_inference/v1/HealthStatus";
export type { ModelInfo__Output } from "./generated/vla_inference/v1/ModelInfo";
export type { Observation } from "./generated/vla_inference/v1/Observation";
export type { StreamError__Output } from "./generated/vla_inference/v1/StreamError";
export type { TimingBreakdown__Output } from "./generated/vla_inference/v1/TimingBreakdown";

import type { ActionChunk__Output } from "./generated/vla_inference/v1/ActionChunk";
import type { HealthStatus__Output } from "./generated/vla_inference/v1/HealthStatus";
import type { ModelInfo__Output } from "./generated/vla_inference/v1/ModelInfo";

/** Shorter names for what the server sends back. */
export type ActionChunkResult = ActionChunk__Output;
export type ModelInfo = ModelInfo__Output;
export type HealthStatus = HealthStatus__Output;

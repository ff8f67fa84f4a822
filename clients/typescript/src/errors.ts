/** Errors surfaced by the client: every failed call rejects with a VLAError carrying the gRPC status. */
import { Metadata, status as Status } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";

import type { ActionChunk__Output } from "./generated/vla_inference/v1/ActionChunk";

export { Status };

/** The name of a gRPC status code, e.g. 3 -> "INVALID_ARGUMENT". */
export function statusName(code: number): string {
  return (Status as unknown as Record<number, string>)[code] ?? `STATUS_${code}`;
}

export class VLAError extends Error {
  /** The gRPC status code (`Status.INVALID_ARGUMENT`, `Status.UNAUTHENTICATED`, ...). */
  readonly code: Status;
  /** The status name, e.g. "INVALID_ARGUMENT". */
  readonly codeName: string;
  /** The server's message, e.g. "invalid observation: joint_positions: expected 7 values ...". */
  readonly details: string;
  /** Trailing metadata of the failed call, when there is any. */
  readonly metadata: Metadata | undefined;

  constructor(code: Status, details: string, metadata?: Metadata) {
    super(`${statusName(code)}: ${details}`);
    this.name = "VLAError";
    this.code = code;
    this.codeName = statusName(code);
    this.details = details;
    this.metadata = metadata;
  }

  /** Wrap whatever a grpc-js call failed with; a VLAError is returned as it is. */
  static from(error: unknown): VLAError {
    if (error instanceof VLAError) {
      return error;
    }
    const service = error as Partial<ServiceError>;
    if (service !== null && typeof service === "object" && typeof service.code === "number") {
      return new VLAError(service.code, service.details ?? service.message ?? "", service.metadata);
    }
    return new VLAError(Status.UNKNOWN, error instanceof Error ? error.message : String(error));
  }
}

/**
 * A StreamControl answer for an observation that failed carries `error` instead of actions (the
 * session goes on). This returns that failure as a VLAError, or null for a successful answer.
 */
export function chunkError(chunk: ActionChunk__Output): VLAError | null {
  if (chunk.error === null || chunk.error === undefined || chunk.error.code === Status.OK) {
    return null;
  }
  return new VLAError(chunk.error.code, chunk.error.message);
}

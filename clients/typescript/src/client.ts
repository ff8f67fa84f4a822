/**
 * VLAInferenceClient: Predict, StreamControl, GetModelInfo and HealthCheck over @grpc/grpc-js,
 * with per-call deadlines, TLS / mutual TLS, bearer tokens and VLAError for every failure.
 */
import * as grpc from "@grpc/grpc-js";

import { VLAError } from "./errors";
import type { ActionChunk__Output } from "./generated/vla_inference/v1/ActionChunk";
import type { HealthStatus__Output } from "./generated/vla_inference/v1/HealthStatus";
import type { ModelInfo__Output } from "./generated/vla_inference/v1/ModelInfo";
import type { Observation } from "./generated/vla_inference/v1/Observation";
import type { VLAInferenceClient as GeneratedClient } from "./generated/vla_inference/v1/VLAInference";
import { loadProto } from "./proto";

/** Deadline of unary calls when neither the call nor the client sets one (as the Python client). */
export const DEFAULT_TIMEOUT_MS = 10_000;
/** The server's default VLA_MAX_MESSAGE_SIZE_MB. */
export const DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

export interface TlsOptions {
  /** PEM of the CA that signed the server certificate; omitted = the system's roots. */
  rootCerts?: Buffer | string;
  /** Mutual TLS: this client's certificate chain (PEM), with `privateKey`. */
  certChain?: Buffer | string;
  /** Mutual TLS: this client's private key (PEM), with `certChain`. */
  privateKey?: Buffer | string;
  /** Name to check the server certificate against when it differs from the target's host. */
  serverName?: string;
}

export interface ClientOptions {
  /** `true` = TLS with the system's root certificates; an object sets certificates (mutual TLS). */
  tls?: boolean | TlsOptions;
  /** Bearer token sent as `authorization: Bearer <token>` on every call (VLA_AUTH_TOKENS). */
  token?: string;
  /** Deadline of unary calls that set none (default 10 s). Streams have none unless asked. */
  timeoutMs?: number;
  /** Largest message in either direction (default 16 MiB, the server's default). */
  maxMessageBytes?: number;
  /** Further grpc-js channel options. */
  channelOptions?: grpc.ChannelOptions;
}

export interface CallOptions {
  /** Deadline as milliseconds from now. */
  timeoutMs?: number;
  /** Deadline as an absolute time (wins over timeoutMs). */
  deadline?: Date | number;
  /** Cancels the call (it then fails with Status.CANCELLED). */
  signal?: AbortSignal;
}

function toBuffer(value: Buffer | string | undefined): Buffer | null {
  if (value === undefined) {
    return null;
  }
  return typeof value === "string" ? Buffer.from(value) : value;
}

function channelCredentials(tls: ClientOptions["tls"]): grpc.ChannelCredentials {
  if (tls === undefined || tls === false) {
    return grpc.credentials.createInsecure();
  }
  const options: TlsOptions = tls === true ? {} : tls;
  if ((options.certChain === undefined) !== (options.privateKey === undefined)) {
    throw new TypeError("mutual TLS needs both tls.certChain and tls.privateKey");
  }
  return grpc.credentials.createSsl(
    toBuffer(options.rootCerts),
    toBuffer(options.privateKey),
    toBuffer(options.certChain),
  );
}

/** A StreamControl session: write observations, iterate over the answers, close when done. */
export class ControlSession implements AsyncIterable<ActionChunk__Output> {
  private readonly call: grpc.ClientDuplexStream<Observation, ActionChunk__Output>;
  private iterator: AsyncIterator<ActionChunk__Output> | undefined;
  private ended = false;
  private cancelled = false;

  /** @internal */
  constructor(call: grpc.ClientDuplexStream<Observation, ActionChunk__Output>) {
    this.call = call;
    // Errors surface through iteration / read(); this keeps an unread error from being "unhandled".
    this.call.on("error", () => undefined);
  }

  /** Send one observation. The server answers each one it acts on, in order. */
  write(observation: Observation): void {
    if (this.ended || this.cancelled) {
      throw new VLAError(grpc.status.FAILED_PRECONDITION, "the session is closed; open a new one");
    }
    this.call.write(observation);
  }

  /** No more observations: the answers still due arrive, then iteration ends. */
  close(): void {
    if (!this.ended) {
      this.ended = true;
      this.call.end();
    }
  }

  /** Abandon the session at once; iteration ends without an error. */
  cancel(): void {
    this.cancelled = true;
    this.call.cancel();
  }

  /** The next answer, or undefined when the session has ended. */
  async read(): Promise<ActionChunk__Output | undefined> {
    const next = await this[Symbol.asyncIterator]().next();
    return next.done === true ? undefined : next.value;
  }

  /** The answers, in order. Leaving a `for await` loop early cancels the session. */
  [Symbol.asyncIterator](): AsyncIterator<ActionChunk__Output> {
    if (this.iterator === undefined) {
      this.iterator = this.answers();
    }
    return this.iterator;
  }

  private async *answers(): AsyncGenerator<ActionChunk__Output> {
    try {
      for await (const chunk of this.call) {
        yield chunk as ActionChunk__Output;
      }
    } catch (error) {
      const failure = VLAError.from(error);
      if (this.cancelled && failure.code === grpc.status.CANCELLED) {
        return;
      }
      throw failure;
    } finally {
      this.ended = true;
    }
  }
}

export class VLAInferenceClient {
  private readonly stub: GeneratedClient;
  private readonly token: string | undefined;
  private readonly timeoutMs: number;

  /**
   * @param target "host:port" of the server, e.g. "vla-inference:50051".
   */
  constructor(target: string, options: ClientOptions = {}) {
    const maxBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    const channelOptions: grpc.ChannelOptions = {
      "grpc.max_receive_message_length": maxBytes,
      "grpc.max_send_message_length": maxBytes,
      "grpc.keepalive_time_ms": 30_000,
      "grpc.keepalive_timeout_ms": 10_000,
      "grpc.keepalive_permit_without_calls": 1,
      ...options.channelOptions,
    };
    if (typeof options.tls === "object" && options.tls.serverName !== undefined) {
      channelOptions["grpc.ssl_target_name_override"] = options.tls.serverName;
      channelOptions["grpc.default_authority"] = options.tls.serverName;
    }
    if (options.token !== undefined && !/^[\x21-\x7e]+$/.test(options.token)) {
      throw new TypeError("token must be printable ASCII without spaces");
    }
    const Service = loadProto().vla_inference.v1.VLAInference;
    this.stub = new Service(target, channelCredentials(options.tls), channelOptions);
    this.token = options.token;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  }

  /** One observation in, one chunk of future actions out (`chunk.actions[i].jointCommands`). */
  predict(observation: Observation, options: CallOptions = {}): Promise<ActionChunk__Output> {
    return this.unary((md, opts, cb) => this.stub.Predict(observation, md, opts, cb), options);
  }

  /** Open a control session (bidirectional stream). It has no deadline unless `options` sets one. */
  streamControl(options: CallOptions = {}): ControlSession {
    const callOptions: grpc.CallOptions = {};
    const deadline = this.deadline(options, undefined);
    if (deadline !== undefined) {
      callOptions.deadline = deadline;
    }
    const call = this.stub.StreamControl(this.metadata(), callOptions);
    const session = new ControlSession(call);
    options.signal?.addEventListener("abort", () => session.cancel(), { once: true });
    return session;
  }

  /** What the served model is and expects (action_dim, state_dims, camera names, ...). */
  getModelInfo(options: CallOptions = {}): Promise<ModelInfo__Output> {
    return this.unary((md, opts, cb) => this.stub.GetModelInfo({}, md, opts, cb), options);
  }

  /** Liveness and load of the server. */
  healthCheck(options: CallOptions = {}): Promise<HealthStatus__Output> {
    return this.unary((md, opts, cb) => this.stub.HealthCheck({}, md, opts, cb), options);
  }

  /** Resolve once the channel is connected (rejects with UNAVAILABLE after `timeoutMs`). */
  waitForReady(timeoutMs: number = this.timeoutMs): Promise<void> {
    return new Promise((resolve, reject) => {
      this.stub.waitForReady(Date.now() + timeoutMs, (error) => {
        if (error) {
          reject(new VLAError(grpc.status.UNAVAILABLE, error.message));
        } else {
          resolve();
        }
      });
    });
  }

  /** Close the channel; calls in progress are cancelled. */
  close(): void {
    this.stub.close();
  }

  private metadata(): grpc.Metadata {
    const metadata = new grpc.Metadata();
    if (this.token !== undefined) {
      metadata.set("authorization", `Bearer ${this.token}`);
    }
    return metadata;
  }

  private deadline(options: CallOptions, fallbackMs: number | undefined): Date | undefined {
    if (options.deadline !== undefined) {
      return new Date(options.deadline);
    }
    const ms = options.timeoutMs ?? fallbackMs;
    return ms === undefined ? undefined : new Date(Date.now() + ms);
  }

  private unary<T>(
    start: (
      metadata: grpc.Metadata,
      options: grpc.CallOptions,
      callback: grpc.requestCallback<T>,
    ) => grpc.ClientUnaryCall,
    options: CallOptions,
  ): Promise<T> {
    if (options.signal?.aborted) {
      return Promise.reject(new VLAError(grpc.status.CANCELLED, "aborted before the call started"));
    }
    return new Promise<T>((resolve, reject) => {
      const deadline = this.deadline(options, this.timeoutMs);
      const onAbort = (): void => call.cancel();
      const call = start(this.metadata(), { deadline }, (error, response) => {
        options.signal?.removeEventListener("abort", onAbort);
        if (error) {
          reject(VLAError.from(error));
        } else if (response === undefined) {
          reject(new VLAError(grpc.status.INTERNAL, "the server sent no response"));
        } else {
          resolve(response);
        }
      });
      options.signal?.addEventListener("abort", onAbort, { once: true });
    });
  }
}

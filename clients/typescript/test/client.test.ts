/**
 * The client against the real Python server (the embedded default policy, plaintext, token auth on):
 * the original design's snippet, predict, streams, typed errors, deadlines, cancellation, auth.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { chunkError, Status, VLAError, VLAInferenceClient, type ActionChunkResult, type ModelInfo } from "../src/index";
import { connect, FIXTURES, observationFor, startServer, type RunningServer } from "./server";

const TOKEN = "ts-client-test-token-0123456789";

let server: RunningServer;
let client: VLAInferenceClient;
let info: ModelInfo;

function assertChunk(chunk: ActionChunkResult): void {
  assert.equal(chunk.error, null);
  assert.equal(chunk.actions.length, info.chunkSize);
  for (const action of chunk.actions) {
    assert.equal(action.jointCommands.length, info.actionDim);
    assert.ok(action.jointCommands.every(Number.isFinite));
  }
}

async function rejection(promise: Promise<unknown>): Promise<VLAError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof VLAError, `expected a VLAError, got ${String(error)}`);
    return error;
  }
  assert.fail("the call succeeded; expected it to fail");
}

before(async () => {
  server = await startServer({ VLA_AUTH_TOKENS: TOKEN });
  client = connect(server, { token: TOKEN });
  info = await client.getModelInfo();
});

after(async () => {
  client?.close();
  await server?.stop();
});

describe("unary calls", () => {
  test("GetModelInfo describes the model the observations are built from", () => {
    assert.ok(info.modelName.length > 0);
    assert.ok(info.actionDim > 0);
    assert.ok(info.chunkSize > 0);
    assert.ok(info.supportedEmbodiments.includes(info.defaultEmbodiment));
    assert.ok(info.stateDims[info.defaultEmbodiment] > 0);
    assert.ok(info.cameraNames.includes("base"));
  });

  test("HealthCheck reports SERVING", async () => {
    const health = await client.healthCheck();
    assert.equal(health.ready, true);
    assert.equal(health.state, "SERVING");
    assert.equal(health.modelName, info.modelName);
    assert.ok(health.uptimeSeconds > 0);
  });

  test("the original design's snippet works as written", async () => {
    const imageBuffer = readFileSync(join(FIXTURES, "frame.jpg"));
    const joints = Array.from({ length: info.stateDims[info.defaultEmbodiment] }, (_, i) => 0.1 * (i + 1));
    const executed: number[][] = [];
    const robot = { executeAction: async (commands: number[]) => void executed.push(commands) };

    const vla = new VLAInferenceClient(server.target, { token: TOKEN });
    try {
      const actionChunk = await vla.predict({
        cameraImage: imageBuffer,
        jointPositions: joints,
        languageInstruction: "Pick up the red cup",
        embodimentTag: info.defaultEmbodiment,
      });
      for (const action of actionChunk.actions) {
        await robot.executeAction(action.jointCommands);
      }
      assertChunk(actionChunk);
    } finally {
      vla.close();
    }
    assert.equal(executed.length, info.chunkSize);
  });

  test("predict echoes request id and timestamp, reports timing, and a seed makes it reproducible", async () => {
    const observation = observationFor(info, { requestId: "robot-7/42", timestamp: 1234.5, seed: 7 });
    const first = await client.predict(observation);
    const second = await client.predict(observation);
    assertChunk(first);
    assert.equal(first.requestId, "robot-7/42");
    assert.equal(first.observationTimestamp, 1234.5);
    assert.equal(first.modelName, info.modelName);
    assert.ok(first.timing !== null && first.timing.totalMs > 0 && first.timing.batchSize >= 1);
    assert.deepEqual(
      second.actions.map((a) => a.jointCommands),
      first.actions.map((a) => a.jointCommands),
    );
    const other = await client.predict({ ...observation, seed: 8 });
    assert.notDeepEqual(
      other.actions.map((a) => a.jointCommands),
      first.actions.map((a) => a.jointCommands),
    );
  });

  test("a wrong joint count is INVALID_ARGUMENT as a VLAError naming the field", async () => {
    const joints = info.stateDims[info.defaultEmbodiment] + 3;
    const error = await rejection(
      client.predict(observationFor(info, { jointPositions: new Array<number>(joints).fill(0) })),
    );
    assert.equal(error.code, Status.INVALID_ARGUMENT);
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.match(error.details, /joint_positions/);
    assert.match(error.message, /^INVALID_ARGUMENT: /);
  });

  test("a corrupt image and an unknown embodiment are INVALID_ARGUMENT", async () => {
    const corrupt = await rejection(
      client.predict(observationFor(info, { cameraImage: Buffer.from("not a jpeg"), cameraImageEncoding: "IMAGE_ENCODING_JPEG" })),
    );
    assert.equal(corrupt.code, Status.INVALID_ARGUMENT);
    assert.match(corrupt.details, /camera_image/);
    const unknown = await rejection(client.predict(observationFor(info, { embodimentTag: "unitree_h1" })));
    assert.equal(unknown.code, Status.INVALID_ARGUMENT);
    assert.match(unknown.details, /unitree_h1/);
  });

  test("a per-call deadline fails with DEADLINE_EXCEEDED", async () => {
    const byTimeout = await rejection(client.predict(observationFor(info), { timeoutMs: 1 }));
    assert.equal(byTimeout.code, Status.DEADLINE_EXCEEDED);
    const byDate = await rejection(client.healthCheck({ deadline: Date.now() - 1000 }));
    assert.equal(byDate.code, Status.DEADLINE_EXCEEDED);
    // The client still works afterwards.
    assertChunk(await client.predict(observationFor(info), { timeoutMs: 60_000 }));
  });

  test("an AbortSignal cancels the call", async () => {
    const controller = new AbortController();
    const pending = client.predict(observationFor(info), { signal: controller.signal });
    controller.abort();
    const error = await rejection(pending);
    assert.equal(error.code, Status.CANCELLED);
  });
});

describe("StreamControl", () => {
  test("a closed-loop session answers every observation in order", async () => {
    const session = client.streamControl();
    const ids = ["s-0", "s-1", "s-2", "s-3"];
    const answered: string[] = [];
    session.write(observationFor(info, { requestId: ids[0], timestamp: 0 }));
    for await (const chunk of session) {
      assertChunk(chunk);
      answered.push(chunk.requestId);
      assert.equal(chunk.observationTimestamp, answered.length - 1);
      if (answered.length < ids.length) {
        session.write(observationFor(info, { requestId: ids[answered.length], timestamp: answered.length }));
      } else {
        session.close();
      }
    }
    assert.deepEqual(answered, ids);
    assert.throws(() => session.write(observationFor(info)), VLAError);
  });

  test("observations sent at once are each answered or listed as skipped, in order", async () => {
    const session = client.streamControl({ timeoutMs: 120_000 });
    const ids = Array.from({ length: 5 }, (_, i) => `burst-${i}`);
    for (const id of ids) {
      session.write(observationFor(info, { requestId: id }));
    }
    session.close();
    const answered: string[] = [];
    const skipped: string[] = [];
    for await (const chunk of session) {
      assertChunk(chunk);
      answered.push(chunk.requestId);
      skipped.push(...chunk.skippedRequestIds);
    }
    assert.ok(answered.length >= 1);
    assert.equal(answered.at(-1), "burst-4", "the newest observation is always answered");
    assert.deepEqual([...answered, ...skipped].sort(), [...ids].sort());
    const positions = answered.map((id) => ids.indexOf(id));
    assert.deepEqual(positions, [...positions].sort((a, b) => a - b));
  });

  test("a bad observation is answered with an error and the session goes on", async () => {
    const session = client.streamControl();
    session.write(observationFor(info, { requestId: "bad", jointPositions: [Number.NaN] }));
    const bad = await session.read();
    assert.ok(bad !== undefined);
    assert.equal(bad.requestId, "bad");
    assert.equal(bad.actions.length, 0);
    const error = chunkError(bad);
    assert.ok(error instanceof VLAError);
    assert.equal(error.code, Status.INVALID_ARGUMENT);
    session.write(observationFor(info, { requestId: "good" }));
    const good = await session.read();
    assert.ok(good !== undefined);
    assert.equal(good.requestId, "good");
    assert.equal(chunkError(good), null);
    assertChunk(good);
    session.close();
    assert.equal(await session.read(), undefined);
  });

  test("cancel() ends the session without an error", async () => {
    const session = client.streamControl();
    session.write(observationFor(info));
    session.cancel();
    for await (const chunk of session) {
      assertChunk(chunk);
    }
  });
});

describe("token authentication", () => {
  test("calls without the token are UNAUTHENTICATED", async () => {
    const anonymous = connect(server);
    try {
      const error = await rejection(anonymous.predict(observationFor(info)));
      assert.equal(error.code, Status.UNAUTHENTICATED);
      assert.match(error.details, /bearer token/);
      assert.equal((await rejection(anonymous.getModelInfo())).code, Status.UNAUTHENTICATED);
      const session = anonymous.streamControl();
      session.write(observationFor(info));
      await assert.rejects(session.read(), (e: unknown) => e instanceof VLAError && e.code === Status.UNAUTHENTICATED);
    } finally {
      anonymous.close();
    }
  });

  test("a wrong token is UNAUTHENTICATED; the right one works", async () => {
    const wrong = connect(server, { token: "not-the-right-token-0000000000" });
    try {
      assert.equal((await rejection(wrong.healthCheck())).code, Status.UNAUTHENTICATED);
    } finally {
      wrong.close();
    }
    assert.equal((await client.healthCheck()).ready, true);
  });

  test("a token that cannot travel in a header is refused before any call", () => {
    assert.throws(() => new VLAInferenceClient(server.target, { token: "has space" }), TypeError);
  });
});

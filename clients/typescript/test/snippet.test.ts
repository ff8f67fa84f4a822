/**
 * The original design's integration example, word for word, against a server whose model knows
 * the `unitree_h1` embodiment: a tiny pi0 checkpoint in openpi's format (random weights, 19 joints,
 * statistics under the asset id "unitree_h1"), written by the project's own test helper.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { VLAInferenceClient } from "../src/index";
import { FIXTURES, pythonExecutable, REPO_ROOT, startServer, type RunningServer } from "./server";

const H1_JOINTS = 19;
let server: RunningServer;
let scratch: string;

before(async () => {
  scratch = mkdtempSync(join(tmpdir(), "vla-ts-h1-"));
  const checkpoint = join(scratch, "pi0-h1");
  execFileSync(
    pythonExecutable(),
    [
      "-c",
      "import sys; from tests.helpers.pi0_checkpoints import write_tiny_openpi_checkpoint as w; " +
        `w(sys.argv[1], asset_ids=("unitree_h1",), state_dim=${H1_JOINTS}, action_dim=${H1_JOINTS})`,
      checkpoint,
    ],
    { cwd: REPO_ROOT },
  );
  server = await startServer({ VLA_MODEL_PATH: checkpoint, VLA_CHUNK_SIZE: "8" });
});

after(async () => {
  await server?.stop();
  rmSync(scratch, { recursive: true, force: true });
});

test("the original design's snippet works as written", async () => {
  const imageBuffer = readFileSync(join(FIXTURES, "frame.jpg"));
  const executed: number[][] = [];
  const robot = { executeAction: async (jointCommands: number[]) => void executed.push(jointCommands) };

  const client = new VLAInferenceClient(server.target);
  const actionChunk = await client.predict({
    cameraImage: imageBuffer,
    jointPositions: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9],
    languageInstruction: "Pick up the red cup",
    embodimentTag: "unitree_h1",
  });
  for (const action of actionChunk.actions) {
    await robot.executeAction(action.jointCommands);
  }
  client.close();

  assert.equal(executed.length, 8);
  assert.ok(executed.every((commands) => commands.length === H1_JOINTS && commands.every(Number.isFinite)));
});

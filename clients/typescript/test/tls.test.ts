/**
 * TLS and mutual TLS against the real server: certificates made at test time by the Python test
 * PKI (tests/support/certs.py), the server started with VLA_TLS_* set.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { Status, VLAError, VLAInferenceClient } from "../src/index";
import { observationFor, pythonExecutable, REPO_ROOT, startServer, type RunningServer } from "./server";

let server: RunningServer;
let pki: string;
const read = (name: string): Buffer => readFileSync(join(pki, name));

before(async () => {
  pki = mkdtempSync(join(tmpdir(), "vla-ts-pki-"));
  execFileSync(
    pythonExecutable(),
    ["-c", "import sys; from pathlib import Path; from tests.support.certs import make_pki; make_pki(Path(sys.argv[1]))", pki],
    { cwd: REPO_ROOT },
  );
  server = await startServer({
    VLA_TLS_CERT_FILE: join(pki, "server.crt"),
    VLA_TLS_KEY_FILE: join(pki, "server.key"),
    VLA_TLS_CLIENT_CA_FILE: join(pki, "ca.crt"),
  });
});

after(async () => {
  await server?.stop();
  rmSync(pki, { recursive: true, force: true });
});

test("mutual TLS: a client with a certificate from the server's client CA is served", async () => {
  const client = new VLAInferenceClient(`localhost:${server.port}`, {
    tls: { rootCerts: read("ca.crt"), certChain: read("client.crt"), privateKey: read("client.key") },
  });
  try {
    const info = await client.getModelInfo();
    const chunk = await client.predict(observationFor(info));
    assert.equal(chunk.actions.length, info.chunkSize);
    assert.equal((await client.healthCheck()).ready, true);
  } finally {
    client.close();
  }
});

test("mutual TLS: no client certificate, or one from a foreign CA, cannot connect", async () => {
  for (const tls of [
    { rootCerts: read("ca.crt") },
    { rootCerts: read("ca.crt"), certChain: read("foreign-client.crt"), privateKey: read("foreign-client.key") },
  ]) {
    const client = new VLAInferenceClient(`localhost:${server.port}`, { tls, timeoutMs: 5_000 });
    try {
      await assert.rejects(client.healthCheck(), (e: unknown) => e instanceof VLAError && e.code === Status.UNAVAILABLE);
    } finally {
      client.close();
    }
  }
});

test("TLS: a server certificate from an unknown CA is refused; plaintext cannot talk to a TLS port", async () => {
  const untrusting = new VLAInferenceClient(`localhost:${server.port}`, {
    tls: { rootCerts: read("foreign-ca.crt"), certChain: read("client.crt"), privateKey: read("client.key") },
    timeoutMs: 5_000,
  });
  const plaintext = new VLAInferenceClient(`localhost:${server.port}`, { timeoutMs: 5_000 });
  try {
    await assert.rejects(untrusting.healthCheck(), (e: unknown) => e instanceof VLAError && e.code === Status.UNAVAILABLE);
    await assert.rejects(plaintext.healthCheck(), (e: unknown) => e instanceof VLAError && e.code === Status.UNAVAILABLE);
  } finally {
    untrusting.close();
    plaintext.close();
  }
});

test("half a client certificate is a TypeError at construction", () => {
  assert.throws(() => new VLAInferenceClient("localhost:1", { tls: { certChain: read("client.crt") } }), TypeError);
});

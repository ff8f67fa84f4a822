"""Readable tables (markdown, also printed) and the goal check from one result dict."""

from __future__ import annotations

from typing import Any

from bench.fast_decode import markdown as fast_decode_markdown


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ms(stats: dict[str, Any] | None, key: str, digits: int = 2) -> str:
    if not stats or not stats.get("n"):
        return "-"
    return _f(stats.get(key), digits)


def goal_status(result: dict[str, Any]) -> dict[str, Any]:
    """Where the default model stands against each goal (goals, not assertions)."""
    goals = result.get("goals", {})
    first = next((t for t in result.get("targets", []) if "floor" in t), None)
    status: dict[str, Any] = {}
    if first is None:
        return {"note": "the default model did not run"}
    stub = first.get("overhead_stub")
    if stub and stub["e2e"].get("n"):
        p50 = stub["e2e"]["p50_ms"]
        status["overhead_p50_ms"] = {
            "value": p50,
            "goal": f"<= {goals.get('overhead_p50_ms')}",
            "met": p50 <= goals.get("overhead_p50_ms", 2.0),
            "source": "Predict e2e with the forward pass stubbed (server path only)",
        }
    floor = first.get("transport_floor")
    if floor:
        for q in ("p50", "p99"):
            key = f"overhead_ratio_{q}"
            status[key] = {
                "value": floor[key],
                "goal": "none: replaced by the server CPU per request and the ingest ceiling (issue 28)",
                "met": None,
                "source": f"stubbed Predict e2e {q} / transport floor e2e {q} "
                f"({floor[q + '_ms']} ms), same client and request bytes, same run",
            }
    unary = first.get("unary")
    if unary and unary.get("non_model", {}).get("n"):
        status["overhead_real_model_non_model_ms"] = {
            "p50": unary["non_model"]["p50_ms"],
            "p99": unary["non_model"]["p99_ms"],
            "source": "Predict e2e minus the server-timed forward pass, real model",
        }
    eff = first.get("efficiency_at_8")
    if eff is not None:
        status["efficiency_at_8"] = {
            "value": eff,
            "goal": f">= {goals.get('efficiency_at_8')}",
            "met": eff >= goals.get("efficiency_at_8", 0.8),
        }
    peer = result.get("peer", {})
    if "throughput_ratio_ours_over_theirs" in peer:
        status["vs_ray_throughput"] = {
            "ratio": peer["throughput_ratio_ours_over_theirs"],
            "goal": "> 1 (ours ahead)",
            "met": peer["throughput_ratio_ours_over_theirs"] > 1,
        }
        status["vs_ray_p99"] = {
            "ratio": peer["p99_ratio_ours_over_theirs"],
            "goal": "< 1 (ours lower)",
            "met": peer["p99_ratio_ours_over_theirs"] < 1,
        }
    elif peer:
        status["vs_ray"] = {"met": None, "note": peer.get("skipped", "no comparison")}
    for row in result.get("scheduling", {}).get("goals", []):
        status[f"issue 28: {row['goal']}"] = {"value": row["value"], "met": row["met"]}
    return status


def markdown(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    lines = [
        f"# vla-inference benchmark {result.get('started_utc', '')}",
        "",
        f"`{result.get('command', '')}` — {result.get('duration_s', '?')} s on {m.get('nproc')} cores "
        f"({m.get('cpu_model')}), torch {m.get('torch')}, grpcio {m.get('grpcio')}, "
        f"ray {m.get('ray') or 'not installed'}, load average at start {_load(m)}, "
        f"commit {m.get('git_commit', '?')}{' (dirty tree)' if m.get('git_dirty') else ''}.",
        "",
    ]
    targets = result.get("targets", [])
    lines += ["## 1. Floor: batched forward pass in-process (forward + finish)", ""]
    lines += [
        "| model | batch | p50 ms | p99 ms | n | per sample ms | samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        if "floor" not in t:
            continue
        for size, s in t["floor"]["batches"].items():
            lines.append(
                f"| {t['name']} | {size} | {_ms(s, 'p50_ms', 1)} | {_ms(s, 'p99_ms', 1)} | {s.get('n')} "
                f"| {_f(s.get('per_sample_ms'), 1)} | {_f(s.get('samples_per_s'), 2)} |"
            )
    lines += ["", "## 2. Unary Predict over loopback (224x224 JPEG, batching off)", ""]
    lines += [
        "| model | n | e2e p50 | e2e p99 | floor p50 | e2e-floor p50 | e2e-floor p99 | transport p50 "
        "| decode p50 | preprocess p50 | queue p50 | model p50 | postprocess p50 | non-model p50 "
        "| non-model p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        u = t.get("unary")
        if not u:
            continue
        lines.append(_unary_row(t["name"], u))
    stubs = [t for t in targets if t.get("overhead_stub")]
    if stubs:
        lines += [
            "",
            "Server overhead with the forward pass stubbed (real decode, prepare, finish; "
            "cached forward output), against the transport floor (bench/transport_floor.py: a "
            "grpc.aio server that parses the same request bytes and returns a fixed ActionChunk; "
            "ratio = ours / floor, same client, same run):",
            "",
        ]
        lines += [
            "| model | n | e2e p50 | e2e p99 | floor p50 | floor p99 | ratio p50 | ratio p99 "
            "| transport p50 | transport p99 | decode p50 | preprocess p50 "
            "| queue p50 | postprocess p50 | server total p50 | server total p99 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in stubs:
            s = t["overhead_stub"]
            f = t.get("transport_floor", {})
            lines.append(
                f"| {t['name']} | {s['e2e'].get('n')} | {_ms(s['e2e'], 'p50_ms', 3)} "
                f"| {_ms(s['e2e'], 'p99_ms', 3)} | {f.get('p50_ms', '-')} | {f.get('p99_ms', '-')} "
                f"| {f.get('overhead_ratio_p50', '-')} | {f.get('overhead_ratio_p99', '-')} "
                f"| {_ms(s['transport'], 'p50_ms', 3)} | {_ms(s['transport'], 'p99_ms', 3)} "
                f"| {_ms(s['decode'], 'p50_ms', 3)} | {_ms(s['preprocess'], 'p50_ms', 3)} "
                f"| {_ms(s['queue'], 'p50_ms', 3)} | {_ms(s['postprocess'], 'p50_ms', 3)} "
                f"| {_ms(s['server_total'], 'p50_ms', 3)} | {_ms(s['server_total'], 'p99_ms', 3)} |"
            )
        for t in stubs:
            sync = t.get("transport_floor", {}).get("sync_server")
            if sync and sync.get("n"):
                lines.append(
                    f"\n{t['name']}: the same floor served by grpc's synchronous server (thread pool): "
                    f"p50 {_ms(sync, 'p50_ms', 3)} ms, p99 {_ms(sync, 'p99_ms', 3)} ms "
                    f"(grpc.aio: {t['transport_floor'].get('p50_ms', '-')} / "
                    f"{t['transport_floor'].get('p99_ms', '-')} ms)."
                )
    lines += ["", "## 3. StreamControl at a fixed control rate (deadline = one control period)", ""]
    lines += [
        "| model | forward | rate Hz | steps | answered | skipped | p50 ms | p99 ms | deadlines met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        for key, label in (("stream", "real"), ("stream_stub", "stubbed")):
            s = t.get(key)
            if s:
                lines.append(
                    f"| {t['name']} | {label} | {_f(s['rate_hz'], 2)} | {s['steps']} | {s['answered']} "
                    f"| {s['skipped']} | {_ms(s['latency'], 'p50_ms', 1)} | {_ms(s['latency'], 'p99_ms', 1)} "
                    f"| {_f(s['deadline_met_fraction'], 3)} |"
                )
    lines += ["", "## 4. Fleet: closed-loop robots, batching on and off", ""]
    lines += [
        "| model | batching | robots | window s | completed | req/s | p50 ms | p99 ms | ideal req/s "
        "| efficiency | mean batch | server model p50 | server queue p50 | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plan = result.get("plan", {})
    for t in targets:
        for key, label in (
            ("fleet_off", "off (batch 1)"),
            ("fleet_on", f"on (batch {plan.get('batch_size')}, {plan.get('batch_timeout_ms')} ms)"),
        ):
            for r in t.get(key, []):
                lines.append(
                    f"| {t['name']} | {label} | {r['clients']} | {_f(r['steady_window_s'], 1)} "
                    f"| {r['completed']} "
                    f"| {_f(r['throughput_rps'], 3)} | {_ms(r['latency'], 'p50_ms', 1)} "
                    f"| {_ms(r['latency'], 'p99_ms', 1)} | {_f(r['ideal_rps'], 3)} "
                    f"| {_f(r['efficiency'], 2)} | {_f(r.get('mean_batch_size'), 2)} "
                    f"| {_f(r.get('server_model_ms_p50'), 1)} | {_f(r.get('server_queue_ms_p50'), 1)} "
                    f"| {r['errors']} |"
                )
    lines += [""]
    for t in targets:
        if "batching_gain_at_8" in t or "efficiency_at_8" in t:
            lines.append(
                f"- {t['name']}: batching on/off throughput at {plan.get('batch_size')} robots = "
                f"{_f(t.get('batching_gain_at_8'))}x; efficiency at {plan.get('batch_size')} robots = "
                f"{_f(t.get('efficiency_at_8'))}"
            )
    lines += ["", "## 5. Peer: Ray Serve, same model, same machine, same run", ""]
    peer = result.get("peer", {})
    if peer.get("theirs"):
        lines += [
            f"{peer.get('system')} {peer.get('ray')}, {peer.get('ingress')}, {peer.get('batching')}; "
            f"{peer.get('method')}; Ray start-up {peer.get('start_s')} s.",
            "",
            "| server | robots | rounds | completed | req/s | per-round req/s | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, key in (("vla-inference", "ours"), ("Ray Serve", "theirs")):
            r = peer[key]
            per_round = ", ".join(_f(x, 2) for x in r["per_round_rps"])
            lines.append(
                f"| {label} | {peer.get('clients')} | {r['rounds']} | {r['completed']} "
                f"| {_f(r['throughput_rps'], 3)} | {per_round} | {_ms(r['latency'], 'p50_ms', 1)} "
                f"| {_ms(r['latency'], 'p99_ms', 1)} | {r['errors']} |"
            )
        lines += [
            "",
            f"Ours / theirs: throughput {_f(peer.get('throughput_ratio_ours_over_theirs'))}x, "
            f"p99 {_f(peer.get('p99_ratio_ours_over_theirs'))}x (lower is better for p99).",
        ]
    else:
        lines.append(f"Ray Serve: not run ({peer.get('skipped', 'no result')}).")
    pt = result.get("pytriton", {})
    lines += ["", f"PyTriton: {pt.get('skipped') or pt}.", ""]
    skipped = [t for t in targets if t.get("skipped")]
    if skipped:
        lines += ["## Skipped", ""]
        lines += [f"- {t['name']}: {t['skipped']}" for t in skipped]
        lines.append("")
    lines += fast_decode_markdown(result.get("pi0_fast", {}))
    sched = result.get("scheduling", {})
    if sched:
        lines += ["## Scheduling against a simulated device, and CPU per request (issue 28)", ""]
        if sched.get("skipped"):
            lines += [f"Not run ({sched['skipped']}).", ""]
        else:
            from bench.scheduling import markdown as scheduling_markdown

            lines += [scheduling_markdown(sched)]
    lines += ["## Goals (where we stand; not assertions)", ""]
    for name, g in result.get("goal_status", {}).items():
        lines.append(f"- {name}: {_goal(g)}")
    lines.append("")
    return "\n".join(lines)


def _goal(g: Any) -> str:
    if not isinstance(g, dict):
        return str(g)
    met = g.get("met")
    verdict = "" if met is None else (" — met" if met else " — NOT met")
    parts = [f"{k}={v}" for k, v in g.items() if k != "met"]
    return ", ".join(parts) + verdict


def _load(m: dict[str, Any]) -> str:
    load = m.get("loadavg_at_start")
    return " / ".join(f"{x:.2f}" for x in load) if load else "?"


def _unary_row(name: str, u: dict[str, Any]) -> str:
    ov = u.get("overhead_vs_floor", {})
    return (
        f"| {name} | {u['e2e'].get('n')} | {_ms(u['e2e'], 'p50_ms', 1)} | {_ms(u['e2e'], 'p99_ms', 1)} "
        f"| {_f(u.get('floor_p50_ms'), 1)} | {_f(ov.get('p50_ms'), 1)} | {_f(ov.get('p99_ms'), 1)} "
        f"| {_ms(u['transport'], 'p50_ms', 2)} | {_ms(u['decode'], 'p50_ms', 2)} "
        f"| {_ms(u['preprocess'], 'p50_ms', 2)} | {_ms(u['queue'], 'p50_ms', 2)} "
        f"| {_ms(u['model'], 'p50_ms', 1)} "
        f"| {_ms(u['postprocess'], 'p50_ms', 2)} | {_ms(u['non_model'], 'p50_ms', 2)} "
        f"| {_ms(u['non_model'], 'p99_ms', 2)} |"
    )

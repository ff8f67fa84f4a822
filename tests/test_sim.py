"""The simulated robot, its demonstrations and the training objective.

MetaWorld runs for real here (the `sim` extra, which `make test` installs); episodes are short.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from vla_inference.cli import main as cli_main
from vla_inference.models.pi0.demo import tokenizer_bytes
from vla_inference.models.pi0.model import SIZES
from vla_inference.sim import demos, robot
from vla_inference.sim import tasks as mt
from vla_inference.training import train
from vla_inference.training.dataset import DemoDataset

CFG = SIZES["pi0_metaworld"]
REPORT_KEYS = {
    "success_rate",
    "episodes",
    "mean_steps_to_success",
    "latency_p50_ms",
    "latency_p99_ms",
    "stalls",
    "boundary_jump_p99",
    "within_chunk_jump_p99",
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demos")
    demos.record(
        out, ["reach-v3"], 2, seed_start=5, image_size=32, chunk_tail=CFG.action_horizon, processes=1
    )
    return out


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=tokenizer_bytes())


def test_demonstrations_are_stored_as_documented(demo_dir: Path) -> None:
    manifest = demos.read_manifest(demo_dir)
    assert manifest["state_layout"] == list(mt.STATE_LAYOUT) and manifest["action_layout"] == list(
        mt.ACTION_LAYOUT
    )
    episodes = manifest["episodes"]
    assert isinstance(episodes, list) and len(episodes) == 2
    for record in episodes:
        assert record["task"] == "reach-v3" and record["success"] and record["seed"] in mt.TRAIN_SEEDS
        assert record["instruction"] in mt.TASKS["reach-v3"].instructions
        arrays = demos.load_episode(demo_dir, record)
        steps = record["steps"]
        assert arrays["state"].shape == (steps, mt.STATE_DIM) and np.isfinite(arrays["state"]).all()
        assert arrays["action"].shape == (steps + CFG.action_horizon, mt.ACTION_DIM)
        assert np.abs(arrays["action"]).max() <= 1.0 and arrays["executed"].shape == (steps, mt.ACTION_DIM)
        offsets = arrays["jpeg_offsets"]
        frame = simplejpeg.decode_jpeg(arrays["jpeg"][offsets[-2] : offsets[-1]].tobytes())
        assert frame.shape == (32, 32, 3) and len(offsets) == steps + 1
    # Noise injection: the second episode applies noisy actions but records the expert's.
    noisy = demos.load_episode(demo_dir, episodes[1])
    assert episodes[1]["noise_std"] > 0
    assert not np.allclose(noisy["executed"], noisy["action"][: episodes[1]["steps"]])


def test_an_episode_replays_from_its_seed(demo_dir: Path) -> None:
    record = demos.read_manifest(demo_dir)["episodes"][0]  # type: ignore[index]
    arrays = demos.load_episode(demo_dir, record)
    with mt.MetaWorldEpisode("reach-v3", image_size=32) as episode:
        np.testing.assert_array_equal(episode.reset(record["seed"]), arrays["state"][0])
        for action in arrays["executed"]:
            episode.step(action)
        assert episode.success and episode.steps == record["steps"]
        other = episode.reset(record["seed"] + 100)
    assert not np.allclose(other[18:21], arrays["state"][0][18:21])  # another seed, another goal


def test_the_smooth_expert_limits_each_step_and_still_succeeds() -> None:
    def motion(max_step: float) -> tuple[np.ndarray, bool]:
        with mt.MetaWorldEpisode("push-v3", image_size=32, expert_max_step=max_step) as episode:
            episode.reset(1000)
            actions = []
            while not episode.done:
                actions.append(episode.expert_action())
                episode.step(actions[-1])
            return np.linalg.norm(np.diff(np.stack(actions)[:, :3], axis=0), axis=1), episode.success

    raw, raw_success = motion(0.0)
    smooth, smooth_success = motion(mt.SMOOTH_EXPERT_MAX_STEP)
    assert raw.max() > 1.0 and raw_success  # MetaWorld's expert reverses its command in one step
    assert smooth.max() <= mt.SMOOTH_EXPERT_MAX_STEP + 1e-6 and smooth_success
    np.testing.assert_allclose(
        mt.limit_step(np.zeros(3), np.array([3.0, 4.0, 0.0]), 0.5), [0.3, 0.4, 0.0], atol=1e-12
    )


def test_dataset_uses_the_servers_preprocessing(demo_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    data = DemoDataset(demo_dir, CFG, tokenizer)
    batch = data.batch(np.array([0, 3]))
    assert (
        batch.images.shape == (2, 3, 3, 96, 96) and batch.image_masks.tolist() == [[True, False, False]] * 2
    )
    assert batch.images.min() >= -1.0 and batch.images.max() <= 1.0
    np.testing.assert_allclose(batch.state[0, : mt.STATE_DIM], data.state_norm.normalize(data.state[0]))
    assert not batch.state[:, mt.STATE_DIM :].any() and not batch.actions[:, :, mt.ACTION_DIM :].any()
    np.testing.assert_allclose(
        batch.actions[1, :, : mt.ACTION_DIM],
        data.action_norm.normalize(data.actions[3 : 3 + CFG.action_horizon]),
    )
    stats = data.stats["state"]
    np.testing.assert_allclose(stats["mean"], data.state.mean(0), rtol=1e-5, atol=1e-6)


def test_training_loss_falls_on_a_fixed_batch(demo_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    data = DemoDataset(demo_dir, CFG, tokenizer)
    state = train.TrainState(CFG, seed=0, lr=1e-3, weight_decay=0.0)
    batch = data.batch(np.arange(8))
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(batch.actions.shape, generator=generator)
    t = torch.rand(8, generator=generator)
    inputs = batch.inputs()

    def loss() -> torch.Tensor:
        return state.model.flow_matching_loss(inputs, torch.from_numpy(batch.actions), noise, t).mean()

    first = loss().item()
    for _ in range(25):
        state.optimizer.zero_grad()
        value = loss()
        value.backward()
        state.optimizer.step()
    assert loss().item() < 0.5 * first


def test_training_resumes_where_it_stopped(demo_dir: Path, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = DemoDataset(demo_dir, CFG, tokenizer)
    first = train.TrainState(CFG, seed=3, lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        train.train_step(first, data, 4)
        first.update_ema(0.9)
        first.step += 1
    first.save(tmp_path)
    expected = [train.train_step(first, data, 4) for _ in range(2)]
    resumed = train.TrainState(CFG, seed=99, lr=1e-3, weight_decay=0.0)
    resumed.load(tmp_path)
    assert resumed.step == 2
    assert [train.train_step(resumed, data, 4) for _ in range(2)] == expected


def test_export_is_a_checkpoint_the_server_loads(
    demo_dir: Path, tokenizer, tmp_path: Path, server_factory
) -> None:  # type: ignore[no-untyped-def]
    data = DemoDataset(demo_dir, CFG, tokenizer)
    state = train.TrainState(CFG, seed=0, lr=1e-3, weight_decay=0.0)
    path = train.export(state, data, tmp_path / "ckpt", CFG)
    norm = json.loads((path / "assets" / mt.EMBODIMENT / "norm_stats.json").read_text())["norm_stats"]
    np.testing.assert_allclose(norm["actions"]["std"], data.actions.std(0), rtol=1e-5)
    running = server_factory(model_path=str(path))
    with running.client() as client:
        info = client.info()
    assert (
        list(info.supported_embodiments) == [mt.EMBODIMENT] and info.state_dims[mt.EMBODIMENT] == mt.STATE_DIM
    )
    assert info.action_dim == mt.ACTION_DIM and "MetaWorld" in info.description
    assert list(info.state_layouts[mt.EMBODIMENT].names) == list(mt.STATE_LAYOUT)
    assert list(info.action_layouts[mt.EMBODIMENT].names) == list(mt.ACTION_LAYOUT)


def test_fine_tuning_starts_from_an_export_and_keeps_its_normalisation(
    demo_dir: Path, tokenizer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from vla_inference.models.pi0 import checkpoint as ckpt

    data = DemoDataset(demo_dir, CFG, tokenizer)
    base = train.TrainState(CFG, seed=0, lr=1e-3, weight_decay=0.0)
    base.step = 7
    path = train.export(base, data, tmp_path / "base", CFG)
    init = ckpt.load(path)
    stats = train.init_stats(init)
    stats["actions"]["mean"] = [m + 0.5 for m in stats["actions"]["mean"]]  # not the data's own
    tuned_data = DemoDataset(demo_dir, CFG, tokenizer, stats=stats)
    assert tuned_data.stats == stats
    np.testing.assert_allclose(
        tuned_data.action_norm.normalize(data.actions), tuned_data.normalized_actions, rtol=1e-6, atol=1e-7
    )
    assert not np.allclose(tuned_data.normalized_actions, data.normalized_actions)
    tuned = train.TrainState(CFG, seed=1, lr=1e-3, weight_decay=0.0)
    tuned.start_from(init)
    for name, value in base.ema.items():
        torch.testing.assert_close(tuned.model.state_dict()[name], value, rtol=0, atol=0)
        torch.testing.assert_close(tuned.ema[name], value, rtol=0, atol=0)
    out = train.export(tuned, tuned_data, tmp_path / "tuned", CFG, init)
    about = json.loads((out / "config.json").read_text())["vla_inference"]
    assert [stage["steps"] for stage in about["training"]] == [7, 0] and "fine-tuned" in about["description"]
    written = json.loads((out / "assets" / mt.EMBODIMENT / "norm_stats.json").read_text())["norm_stats"]
    assert written["actions"]["mean"] == stats["actions"]["mean"]


# ---- the simulated robot against a server ---------------------------------------------------


@pytest.fixture(scope="module")
def default_server():  # type: ignore[no-untyped-def]
    from tests.conftest import make_settings, start_server

    running = start_server(make_settings(embedded_model="metaworld", batch_size=2))
    yield running
    running.stop(grace_s=1.0)


def _robot(target: str, **overrides) -> tuple[robot.SimConfig, object]:  # type: ignore[no-untyped-def]
    from vla_inference.client import VLAClient

    cfg = robot.SimConfig(target=target, tasks=("reach-v3",), **overrides)
    return cfg, VLAClient(target)


def test_lockstep_executes_the_servers_actions_in_the_simulator(default_server) -> None:  # type: ignore[no-untyped-def]
    cfg, client = _robot(default_server.target, execute_steps=4, max_steps=10)
    with client, mt.MetaWorldEpisode("reach-v3", max_steps=cfg.max_steps) as episode:
        result = robot._Robot(cfg, mt.TASKS["reach-v3"], client).run(episode, 1000)
        final = episode.state
        assert result.steps == len(result.actions) == episode.steps
        assert len(result.latencies_ms) == -(-result.steps // 4)  # one request per 4 executed actions
        assert result.chunk_starts == list(range(0, result.steps, 4))
        # Replaying the executed actions from the same seed reaches the same state: these actions
        # are what the simulator received.
        start = episode.reset(1000)
        for action in result.actions:
            episode.step(np.asarray(action, np.float32))
        np.testing.assert_allclose(episode.state, final, atol=1e-6)
    assert np.linalg.norm(final[:3] - start[:3]) > 1e-3  # the arm moved


def test_realtime_mode_switches_chunks_after_the_delay(default_server) -> None:  # type: ignore[no-untyped-def]
    # peg-insert-side cannot succeed (and so end early) within 14 steps: the hand moves at most 1 cm
    # per axis a step and must reach, grasp and carry the peg into the hole (the experts take ~118).
    task = "peg-insert-side-v3"
    cfg, client = _robot(
        default_server.target, mode="realtime", execute_steps=4, control_hz=0.0, delay_steps=2, max_steps=14
    )
    with client, mt.MetaWorldEpisode(task, max_steps=cfg.max_steps) as episode:
        result = robot._Robot(cfg, mt.TASKS[task], client).run(episode, 1001)
    assert not result.success and result.steps == 14  # the whole episode ran
    # The first chunk arrives after 2 steps of holding still; then every 4 steps a new chunk takes
    # over at its index 2, while 2 actions of the previous one ran during the delay.
    assert result.stalls == 2 and set(result.delays) == {2}
    assert result.chunk_starts == [2, 6, 10]
    assert result.actions[0][:3] == [0.0, 0.0, 0.0] and result.actions[1][:3] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("task", "steps"), [("reach-v3", 44), ("drawer-close-v3", 84)])
def test_the_default_policy_closes_the_loop(default_server, task: str, steps: int) -> None:  # type: ignore[no-untyped-def]
    """Closed-loop smoke: the shipped policy solves two held-out episodes (seed 1000) in lockstep.

    Deterministic here: the simulator replays from its seed and every request carries a fixed
    sampling seed; `make eval` measured the same episodes (docs/evaluation/policy.json)."""
    cfg, client = _robot(default_server.target, execute_steps=4, max_steps=150)
    with client, mt.MetaWorldEpisode(task, max_steps=cfg.max_steps) as episode:
        result = robot._Robot(cfg, mt.TASKS[task], client).run(episode, 1000)
    assert result.success, f"{task} seed 1000 failed after {result.steps} steps"
    assert abs(result.steps - steps) <= 10  # the evaluated episode, within CPU numerics' drift


def test_sim_command_writes_the_report_video_and_plot(default_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "report.json"
    argv = ["sim", "--target", default_server.target, "--tasks", "reach,drawer-close", "--episodes", "2"]
    argv += ["--max-steps", "8", "--json", str(out), "--video-dir", str(tmp_path / "video")]
    argv += ["--video-episodes", "2", "--wait-s", "5"]
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"reach-v3", "drawer-close-v3"}
    for metrics in [*report["tasks"].values(), report["overall"]]:
        assert set(metrics) >= REPORT_KEYS
    assert report["overall"]["episodes"] == 4 and report["tasks"]["reach-v3"]["episodes"] == 2
    assert [e["seed"] for e in report["episodes"]] == [1000, 1001, 1000, 1001]
    assert report["overall"]["latency_p50_ms"] > 0 and report["overall"]["stalls"] == 0
    from PIL import Image

    with Image.open(tmp_path / "video" / "reach-v3-seed1000.gif") as gif:
        assert gif.n_frames == 2  # one frame per request: 8 steps, 4 per chunk
        assert gif.size == (96 * 3, 96 * 3 + 16)  # enlarged 3x, with the caption band under it
    with Image.open(tmp_path / "video" / "drawer-close-v3-seed1000-actions.png") as plot:
        assert plot.size[0] > 100
    written = sorted(p.name for p in (tmp_path / "video").iterdir())
    assert len(written) == 8 and "drawer-close-v3-seed1001.gif" in written  # 2 episodes x 2 tasks x 2 files


def test_the_action_plot_names_each_value_in_full_with_a_scale(tmp_path: Path) -> None:
    from PIL import Image, ImageDraw

    from vla_inference.sim import media

    assert media._ticks(-1.0, 1.5) == [-1.0, 1.5, 0.0] and media._ticks(0.5, 2.0) == [0.5, 2.0]
    names = ("a", "b", "c", "a_very_long_name")
    actions = [[0.1 * t, -0.2, 1.4, -1.0] for t in range(12)]
    path = media.plot_actions(actions, [0, 4, 8], tmp_path / "plot.png", names=names)
    with Image.open(path) as plot:
        dark = np.asarray(plot.convert("L")) < 128
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    # The last panel's label (rows 400-520, left of its tick numbers) is drawn in full: the old plot
    # cut labels at 10 characters ("a_very_lon").
    label_band = dark[400:520, : int(10 + width(names[3]) + 5)]
    assert np.flatnonzero(label_band.any(axis=0)).max() > 10 + width(names[3][:10]) + 3


def test_sim_refuses_a_model_that_is_not_a_metaworld_policy(server_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    running = server_factory()  # the random demo: 7 joints
    assert cli_main(["sim", "--target", running.target, "--tasks", "reach", "--episodes", "1"]) == 2
    assert "metaworld_sawyer" in capsys.readouterr().err


def test_the_shipped_default_policy(default_server) -> None:  # type: ignore[no-untyped-def]
    """The embedded default is the evaluated checkpoint, and says what it is."""
    import hashlib

    from vla_inference.models.pi0.demo import METAWORLD_CHECKPOINT, METAWORLD_SHA256

    digest = hashlib.sha256((METAWORLD_CHECKPOINT / "model.safetensors").read_bytes()).hexdigest()
    assert digest == METAWORLD_SHA256
    with default_server.client() as client:
        info = client.info()
    assert info.model_version == METAWORLD_SHA256[:12] and not info.demo and info.model_family == "pi0"
    assert "MetaWorld" in info.model_name and "not a real-robot policy" in info.model_name
    assert "not a real-robot policy" in info.description and "object and goal coordinates" in info.description
    assert list(info.supported_embodiments) == [mt.EMBODIMENT] and info.default_embodiment == mt.EMBODIMENT
    assert info.state_dims[mt.EMBODIMENT] == mt.STATE_DIM and info.action_dim == mt.ACTION_DIM
    assert list(info.state_layouts[mt.EMBODIMENT].names) == list(mt.STATE_LAYOUT)
    assert list(info.action_layouts[mt.EMBODIMENT].names) == list(mt.ACTION_LAYOUT)
    assert (info.image_width, info.image_height) == (96, 96) and info.model_horizon == 16
    assert list(info.rtc_methods) == ["none", "guided", "hard"]
    assert list(info.camera_names) == ["base"]  # trained with the corner camera only
    import grpc

    from vla_inference.client import VLAError

    frame = np.zeros((96, 96, 3), np.uint8)
    with default_server.client() as client, pytest.raises(VLAError) as err:
        client.predict(frame, [0.0] * mt.STATE_DIM, "open the drawer", cameras={"wrist": frame})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "cameras[0].name"
    assert "this model uses: base" in err.value.message

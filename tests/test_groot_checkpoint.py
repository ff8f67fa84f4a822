"""GR00T N1.5 checkpoint loading and serving, on tiny checkpoints in the published layout.

Proves: the N1.5 directory layout (config.json, sharded safetensors + index, metadata.json,
tokenizer.json) loads through GrootPolicy.load; two embodiments with different dims, cameras,
statistics and transforms are served with their own (gr1 with NVIDIA's fourier_gr1_arms_only:
sin/cos state, min_max actions; new_embodiment with its metadata keys, mean_std / q99 where the
metadata says), checked against values computed here by hand from the statistics the helper
wrote; a mixed batch equals its samples one by one; seeds decide the noise; bad requests and
bad checkpoints fail with errors naming the field / the file / the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.groot_checkpoints import EMBODIMENT_LAYOUTS, tiny_statistics, write_tiny_groot_checkpoint
from vla_inference.config import Settings
from vla_inference.models.base import InvalidObservation, ModelLoadError, Observation
from vla_inference.models.common import flow
from vla_inference.models.groot.policy import GrootPolicy, prompt_text
from vla_inference.models.policy import Raw
from vla_inference.models.registry import model_class


def _settings(**kw: object) -> Settings:
    return Settings(model_type="groot", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_groot_checkpoint(tmp_path_factory.mktemp("groot") / "tiny-groot", seed=0)


@pytest.fixture(scope="module")
def policy(ckpt_dir: Path) -> GrootPolicy:
    p = GrootPolicy(_settings())
    p.load(str(ckpt_dir), "cpu")
    return p


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


# gr1 as fourier_gr1_arms_only serves it: left_arm (2), right_arm (2), left_hand (1), right_hand (1).
GR1_JOINTS = [0.1, -0.4, 1.5, 0.2, 0.9, -2.5]


def gr1_obs(seed: int = 1, instruction: str = "pick up the red cube") -> Observation:
    joints = np.array(GR1_JOINTS, np.float32)
    return Observation(
        images={"base": _image(seed)},
        joint_positions=joints,
        instruction=instruction,
        embodiment="gr1",
        seed=seed,
    )


def ne_obs(seed: int = 2) -> Observation:
    joints = np.array([10.0, 9.5, 11.0, 12.5, 8.0, 10.7], np.float32)
    images = {"base": _image(seed), "wrist": _image(seed + 100)}
    return Observation(
        images=images, joint_positions=joints, instruction="wave", embodiment="new_embodiment", seed=seed
    )


def _stats(tag: str, kind: str, key: str) -> dict[str, np.ndarray]:
    dims = dict(EMBODIMENT_LAYOUTS[tag][kind])
    return {k: np.asarray(v) for k, v in tiny_statistics(tag, kind, key, dims[key], 0).items()}


# --- loading -----------------------------------------------------------------------------------


def test_registry_serves_groot() -> None:
    assert model_class("groot") is GrootPolicy


def test_model_info(policy: GrootPolicy) -> None:
    info = policy.model_info
    assert info.family == "groot"
    assert info.embodiments == ("gr1", "new_embodiment")
    assert info.default_embodiment == "gr1"
    assert dict(info.state_dims) == {"gr1": 6, "new_embodiment": 6}
    assert info.action_dim == 6  # the default embodiment's
    assert info.horizon == 16 and info.chunk_size == 16
    assert info.camera_names == ("base", "left_wrist")  # union: new_embodiment has a wrist view
    assert info.dtype == "float32" and info.device == "cpu"
    # Layouts: the data config's keys in its order (gr1's waist is in metadata, not served).
    arms_only = ("left_arm.0", "left_arm.1", "right_arm.0", "right_arm.1", "left_hand.0", "right_hand.0")
    assert info.state_layouts["gr1"] == arms_only and info.action_layouts["gr1"] == arms_only
    ne = (*(f"single_arm.{i}" for i in range(5)), "gripper.0")
    assert info.state_layouts["new_embodiment"] == ne and info.action_layouts["new_embodiment"] == ne
    assert "fourier_gr1_arms_only" in info.description and "left_arm(2, sin/cos)" in info.description


def test_predict_shapes_and_confidence(policy: GrootPolicy) -> None:
    a = policy.predict(gr1_obs())
    b = policy.predict(ne_obs())
    assert a.actions.shape == (16, 6) and a.actions.dtype == np.float32
    assert b.actions.shape == (16, 6)
    for pred in (a, b):
        assert np.all(np.isfinite(pred.actions))
        assert 0.0 < pred.confidence <= 1.0


def test_warmup_observation_is_servable(policy: GrootPolicy) -> None:
    assert policy.predict(policy.warmup_observation()).actions.shape == (16, 6)


def test_prompt_and_tokens(policy: GrootPolicy) -> None:
    assert prompt_text("wave", 2, 3) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<image 1><img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>"
        "<image 2><img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>"
        "['wave']<|im_end|>\n<|im_start|>assistant\n"
    )
    sample = policy.prepare(ne_obs())
    ids = sample.inputs.input_ids.tolist()
    assert ids[0] == 90 and ids.count(95) == 2 * 16  # <|im_start|>; two views of 16 tokens (tiny)
    assert ids.count(92) == 2 and ids.count(93) == 2  # <img> </img>
    assert sample.inputs.pixels.shape == (2, 3, 32, 32)
    assert float(sample.inputs.pixels.min()) >= -1.0 and float(sample.inputs.pixels.max()) <= 1.0


# --- statistics --------------------------------------------------------------------------------


def test_state_is_transformed_per_key_and_padded(policy: GrootPolicy) -> None:
    # gr1 (fourier_gr1_arms_only): per key [sin(x), cos(x)], no statistics, in the config's order.
    state = policy.prepare(gr1_obs()).inputs.state.numpy()
    la, ra, lh, rh = [0.1, -0.4], [1.5, 0.2], [0.9], [-2.5]
    expected = [f(x) for x in (la, ra, lh, rh) for f in (np.sin, np.cos)]
    np.testing.assert_allclose(state[:12], np.concatenate(expected), atol=1e-6)
    assert state.shape == (16,) and np.all(state[12:] == 0)
    # By hand: sin(-2.5) = -0.598472, cos(-2.5) = -0.801144 (right_hand, the last key).
    assert state[10] == pytest.approx(-0.598472, abs=1e-6) and state[11] == pytest.approx(-0.801144, abs=1e-6)

    # new_embodiment: single_arm mean_std, gripper min_max (no clipping).
    state = policy.prepare(ne_obs()).inputs.state.numpy()
    y = np.array([10.0, 9.5, 11.0, 12.5, 8.0, 10.7])
    sa, gr = _stats("new_embodiment", "state", "single_arm"), _stats("new_embodiment", "state", "gripper")
    expected = np.concatenate(
        [(y[:5] - sa["mean"]) / sa["std"], 2 * (y[5:] - gr["min"]) / (gr["max"] - gr["min"]) - 1]
    )
    np.testing.assert_allclose(state[:6], expected, atol=1e-5)


def test_out_of_range_state_is_not_clipped(policy: GrootPolicy) -> None:
    """min_max has no clipping: state.gripper min = 9.07, max = 12.07 (offset 10.07 - 1 and + 2),
    so 20 -> 2 * (20 - 9.07) / 3 - 1 = 6.286667 (clipping would give 1)."""
    obs = ne_obs()
    far = Observation(**{**obs.__dict__, "joint_positions": np.array([10, 10, 10, 10, 10, 20], np.float32)})
    assert float(policy.prepare(far).inputs.state[5]) == pytest.approx(6.286667, abs=1e-5)


def test_actions_decoded_with_each_embodiments_transforms(policy: GrootPolicy) -> None:
    horizon, dim = 16, 8
    grid = np.linspace(-1.2, 1.2, horizon * dim, dtype=np.float32).reshape(horizon, dim)
    raw = Raw(actions=grid, confidence=0.75)
    z = grid.astype(np.float64)  # no clipping: rows beyond [-1, 1] map beyond the statistics

    out = policy.finish(raw, policy.prepare(gr1_obs()))
    parts, start = [], 0
    for key, width in (("left_arm", 2), ("right_arm", 2), ("left_hand", 1), ("right_hand", 1)):
        st = _stats("gr1", "action", key)
        parts.append((z[:, start : start + width] + 1) / 2 * (st["max"] - st["min"]) + st["min"])
        start += width
    np.testing.assert_allclose(out.actions, np.concatenate(parts, axis=1), rtol=1e-6, atol=1e-5)
    assert out.confidence == 0.75 and out.model_actions is grid  # forward's confidence, passed on

    out = policy.finish(raw, policy.prepare(ne_obs()))
    sa, gr = _stats("new_embodiment", "action", "single_arm"), _stats("new_embodiment", "action", "gripper")
    expected = np.concatenate(
        [
            (z[:, :5] + 1) / 2 * (sa["max"] - sa["min"]) + sa["min"],  # min_max
            (z[:, 5:6] + 1) / 2 * (gr["q99"] - gr["q01"]) + gr["q01"],  # q99
        ],
        axis=1,
    )
    np.testing.assert_allclose(out.actions, expected, rtol=1e-6, atol=1e-5)
    # Hand check: new_embodiment action.gripper has q01 = 9.67, q99 = 12.47 (offset 10 + 0.5 + 0.07),
    # so 0 -> 11.07, +1 -> 12.47 (min_max would give 12.57) and, unclipped, 1.5 -> 13.17.
    for value, robot in ((0.0, 11.07), (1.0, 12.47), (1.5, 13.17)):
        rows = np.full((16, 8), value, np.float32)
        flat = Raw(actions=rows, confidence=1.0)
        assert policy.finish(flat, policy.prepare(ne_obs())).actions[0, 5] == pytest.approx(robot, abs=1e-5)


def test_confidence_definition(policy: GrootPolicy) -> None:
    sample = policy.prepare(gr1_obs())
    rows, dims = policy.model_info.chunk_size, policy.action_width(sample)
    assert (rows, dims) == (16, 6)  # the returned steps, gr1's model action values (6 of 8)
    velocity = np.full((16, 8), 2.0, np.float32)  # every step moves 2 * 0.25 = 0.5
    velocity[:, 6:] = 100.0  # the padding past the embodiment's actions does not count
    assert flow.confidence(velocity, 0.25, rows, dims) == pytest.approx(1 / 1.5)
    assert flow.confidence(np.zeros((16, 8), np.float32), 0.25, rows, dims) == 1.0  # settled

    # forward reports it for the last Euler step of the sampler it ran (4 steps: dt = 0.25)
    noise = policy.noise(sample.seed)[None]
    with torch.inference_mode():
        _, last = policy.loaded.network.sample(policy.collate([sample]), noise, policy.num_steps())
    expected = flow.confidence(last[0].numpy(), 1.0 / policy.num_steps(), rows, dims)
    assert policy.num_steps() == 4
    assert policy.forward([sample])[0].confidence == pytest.approx(expected, abs=1e-6)


# --- batching and seeds ------------------------------------------------------------------------


def test_mixed_batch_equals_one_by_one(policy: GrootPolicy) -> None:
    observations = [gr1_obs(1), ne_obs(2), gr1_obs(3, instruction="place it in the box"), ne_obs(4)]
    alone = [policy.predict(o) for o in observations]
    batched = policy.predict_batch([policy.prepare(o) for o in observations])
    for a, b in zip(alone, batched, strict=True):
        np.testing.assert_allclose(b.actions, a.actions, rtol=1e-5, atol=1e-5)
        assert b.confidence == pytest.approx(a.confidence, rel=1e-5)


def test_seed_decides_noise(policy: GrootPolicy) -> None:
    a1 = policy.predict(gr1_obs(7)).actions
    a2 = policy.predict(gr1_obs(7)).actions
    np.testing.assert_allclose(a1, a2, atol=1e-5)
    obs = gr1_obs(7)
    other = Observation(**{**obs.__dict__, "seed": 8})
    assert not np.allclose(policy.predict(other).actions, a1)


def test_chunk_size_and_denoise_steps(ckpt_dir: Path) -> None:
    short = GrootPolicy(_settings(chunk_size=5, num_denoise_steps=2))
    short.load(str(ckpt_dir), "cpu")
    assert short.model_info.chunk_size == 5
    assert short.predict(gr1_obs()).actions.shape == (5, 6)


def test_default_embodiment_from_norm_stats_key(ckpt_dir: Path) -> None:
    p = GrootPolicy(_settings(norm_stats_key="new_embodiment"))
    p.load(str(ckpt_dir), "cpu")
    assert p.model_info.default_embodiment == "new_embodiment"
    assert p.model_info.camera_names == ("base", "left_wrist")
    obs = ne_obs()
    untagged = Observation(**{**obs.__dict__, "embodiment": ""})
    assert p.predict(untagged).actions.shape == (16, 6)
    bad = GrootPolicy(_settings(norm_stats_key="oxe_droid"))
    with pytest.raises(ModelLoadError, match="oxe_droid"):
        bad.load(str(ckpt_dir), "cpu")


# --- request errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["unitree_h1", "franka"])
def test_unknown_embodiment(policy: GrootPolicy, tag: str) -> None:
    obs = Observation(**{**gr1_obs().__dict__, "embodiment": tag})
    with pytest.raises(InvalidObservation) as err:
        policy.prepare(obs)
    assert err.value.field == "embodiment_tag"
    assert "gr1" in err.value.message and "new_embodiment" in err.value.message and tag in err.value.message


def test_wrong_joint_count(policy: GrootPolicy) -> None:
    # 7 = arms-only's 6 plus the metadata's waist, which fourier_gr1_arms_only does not serve
    obs = Observation(**{**gr1_obs().__dict__, "joint_positions": np.zeros(7, np.float32)})
    with pytest.raises(InvalidObservation) as err:
        policy.prepare(obs)
    assert err.value.field == "joint_positions" and "expected 6" in err.value.message


def test_missing_camera(policy: GrootPolicy) -> None:
    obs = ne_obs()
    obs = Observation(**{**obs.__dict__, "images": {"base": obs.images["base"]}})
    with pytest.raises(InvalidObservation) as err:
        policy.prepare(obs)
    assert err.value.field == "cameras" and "wrist" in err.value.message


def test_camera_by_key_name(policy: GrootPolicy) -> None:
    """new_embodiment's video keys are front, wrist: served as base / left_wrist, or by key name."""
    obs = ne_obs()
    by_role = Observation(
        **{**obs.__dict__, "images": {"base": obs.images["base"], "left_wrist": obs.images["wrist"]}}
    )
    np.testing.assert_allclose(policy.predict(by_role).actions, policy.predict(obs).actions, atol=1e-5)
    renamed = Observation(
        **{**obs.__dict__, "images": {"front": obs.images["base"], "video.wrist": obs.images["wrist"]}}
    )
    np.testing.assert_allclose(policy.predict(renamed).actions, policy.predict(obs).actions, atol=1e-5)


# --- checkpoint errors -------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_no_checkpoint_path() -> None:
    with pytest.raises(ModelLoadError, match="VLA_MODEL_PATH"):
        GrootPolicy(_settings()).load("", "cpu")


def test_missing_tokenizer_names_file_and_fix(ckpt_dir: Path, tmp_path: Path) -> None:
    d = _copy(ckpt_dir, tmp_path / "c")
    (d / "tokenizer.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*VLA_TOKENIZER_PATH"):
        GrootPolicy(_settings()).load(str(d), "cpu")
    p = GrootPolicy(_settings(tokenizer_path=str(tmp_path / "elsewhere.json")))
    p.load(str(d), "cpu")
    assert p.predict(gr1_obs()).actions.shape == (16, 6)


def test_missing_and_unexpected_weights_are_listed(ckpt_dir: Path, tmp_path: Path) -> None:
    d = _copy(ckpt_dir, tmp_path / "c")
    shard = d / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["action_head.surprise.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    with pytest.raises(ModelLoadError) as err:
        GrootPolicy(_settings()).load(str(d), "cpu")
    assert dropped in str(err.value) and "action_head.surprise.weight" in str(err.value)
    assert "missing 1:" in str(err.value) and "unexpected 1:" in str(err.value)  # one format for every family


def test_single_file_checkpoint(ckpt_dir: Path, tmp_path: Path, policy: GrootPolicy) -> None:
    d = _copy(ckpt_dir, tmp_path / "c")
    merged = {}
    for shard in sorted(d.glob("model-*.safetensors")):
        merged.update(load_file(str(shard)))
        shard.unlink()
    (d / "model.safetensors.index.json").unlink()
    save_file(merged, str(d / "model.safetensors"))
    p = GrootPolicy(_settings())
    p.load(str(d), "cpu")
    np.testing.assert_allclose(p.predict(gr1_obs()).actions, policy.predict(gr1_obs()).actions, atol=1e-5)


def test_wrong_model_type(ckpt_dir: Path, tmp_path: Path) -> None:
    d = _copy(ckpt_dir, tmp_path / "c")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gr00t_n1"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="gr00t_n1_5"):
        GrootPolicy(_settings()).load(str(d), "cpu")


def test_metadata_unknown_tags_skipped_and_none_known_refused(ckpt_dir: Path, tmp_path: Path) -> None:
    d = _copy(ckpt_dir, tmp_path / "c")
    meta_file = d / "experiment_cfg" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["my_robot"] = meta["gr1"]
    meta_file.write_text(json.dumps(meta))
    p = GrootPolicy(_settings())
    p.load(str(d), "cpu")
    assert p.model_info.embodiments == ("gr1", "new_embodiment")

    meta_file.write_text(json.dumps({"my_robot": meta["gr1"]}))
    with pytest.raises(ModelLoadError, match="my_robot"):
        GrootPolicy(_settings()).load(str(d), "cpu")
    meta_file.unlink()
    with pytest.raises(ModelLoadError, match=r"metadata\.json"):
        GrootPolicy(_settings()).load(str(d), "cpu")


def test_new_embodiment_checkpoint(tmp_path: Path) -> None:
    d = write_tiny_groot_checkpoint(tmp_path / "ne", seed=3, embodiments=("new_embodiment",))
    p = GrootPolicy(_settings())
    p.load(str(d), "cpu")
    assert p.model_info.embodiments == ("new_embodiment",)
    obs = Observation(
        images={"base": _image(0), "wrist": _image(1)},
        joint_positions=np.zeros(6, np.float32),
        instruction="wave",
        seed=0,
    )
    assert p.predict(obs).actions.shape == (16, 6)


def test_bfloat16_weights(ckpt_dir: Path, policy: GrootPolicy) -> None:
    p = GrootPolicy(_settings(dtype="bfloat16"))
    p.load(str(ckpt_dir), "cpu")
    assert p.model_info.dtype == "bfloat16"
    assert next(p.loaded.network.parameters()).dtype == torch.bfloat16
    got = p.predict(gr1_obs()).actions
    assert np.all(np.isfinite(got))
    # Same network in lower precision: close to the float32 result in robot units.
    np.testing.assert_allclose(got, policy.predict(gr1_obs()).actions, atol=0.15)

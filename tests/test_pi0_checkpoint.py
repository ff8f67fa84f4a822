"""pi0 checkpoint formats, normalisation, preprocessing and the embedded demo.

Checkpoints are tiny random ones written by tests/helpers/pi0_checkpoints.py in the real on-disk
layouts (openpi PyTorch: model.safetensors + config.json + assets/<id>/norm_stats.json; LeRobot:
config.json with "type" + model.safetensors with "model." keys + normalizer safetensors).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.pi0_checkpoints import (
    demo_tokenizer_path,
    tiny_norm_stats,
    write_tiny_lerobot_checkpoint,
    write_tiny_openpi_checkpoint,
)
from vla_inference.config import Settings
from vla_inference.models.base import InvalidObservation, ModelLoadError, Observation, PreparedSample
from vla_inference.models.common import flow
from vla_inference.models.pi0 import checkpoint as ckpt
from vla_inference.models.pi0.policy import Pi0Policy, discretize_state
from vla_inference.models.policy import Raw


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and shared CI cores make two threads spin; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _obs(**kw: object) -> Observation:
    base = {
        "images": {"base": np.full((60, 80, 3), 255, np.uint8)},
        "joint_positions": np.linspace(-0.5, 0.5, 7).astype(np.float32),
        "instruction": "pick up the cup",
        "seed": 0,
    }
    base.update(kw)
    return Observation(**base)  # type: ignore[arg-type]


def _load(path: Path, **settings: object) -> Pi0Policy:
    policy = Pi0Policy(Settings(**settings))  # type: ignore[arg-type]
    policy.load(str(path), "cpu")
    return policy


@pytest.fixture(scope="module")
def openpi_pi0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_openpi_checkpoint(
        tmp_path_factory.mktemp("o") / "pi0", "pi0", asset_ids=("arm_a", "arm_b")
    )


@pytest.fixture(scope="module")
def openpi_pi05(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_openpi_checkpoint(tmp_path_factory.mktemp("o") / "pi05", "pi05")


# ---- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_openpi_checkpoint_loads_and_predicts(tmp_path: Path, variant: str) -> None:
    path = write_tiny_openpi_checkpoint(tmp_path / "c", variant, state_dim=6, action_dim=5)
    assert sorted(p.name for p in path.iterdir()) == [
        "assets",
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    policy = _load(path, chunk_size=10)
    info = policy.model_info
    assert info.family == variant
    assert (info.action_dim, info.chunk_size, info.horizon) == (5, 10, 50)
    assert info.embodiments == ("demo",) and info.state_dims == {"demo": 6}
    assert info.camera_names == ("base", "left_wrist", "right_wrist") and not info.demo
    pred = policy.predict(_obs(joint_positions=np.zeros(6, np.float32)))
    assert pred.actions.shape == (10, 5) and pred.actions.dtype == np.float32
    assert np.isfinite(pred.actions).all() and 0.0 <= pred.confidence <= 1.0


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_lerobot_checkpoint_loads_and_predicts(tmp_path: Path, variant: str) -> None:
    path = write_tiny_lerobot_checkpoint(tmp_path / "c", variant)
    assert json.loads((path / "config.json").read_text())["type"] == variant
    assert all(
        k.startswith("model.paligemma_with_expert.") or k.startswith("model.")
        for k in load_file(path / "model.safetensors")
    )
    policy = _load(path, tokenizer_path=str(demo_tokenizer_path()))
    assert policy.config.pi05 == (variant == "pi05")
    pred = policy.predict(_obs())
    assert pred.actions.shape == (16, 7) and np.isfinite(pred.actions).all()


def test_lerobot_without_tokenizer_says_what_to_do(tmp_path: Path) -> None:
    path = write_tiny_lerobot_checkpoint(tmp_path / "c", "pi0")
    with pytest.raises(ModelLoadError) as err:
        _load(path)
    message = str(err.value)
    assert "tokenizer.model" in message and "VLA_TOKENIZER_PATH" in message and str(path) in message
    assert "LeRobot" in message


def test_openpi_without_tokenizer_says_what_to_do(tmp_path: Path) -> None:
    path = write_tiny_openpi_checkpoint(tmp_path / "c", with_tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.model.*VLA_TOKENIZER_PATH"):
        _load(path)
    # ... and the setting fixes it
    assert _load(path, tokenizer_path=str(demo_tokenizer_path())).predict(_obs()).actions.shape == (16, 7)


def test_missing_and_unexpected_weights_are_listed(tmp_path: Path) -> None:
    path = write_tiny_openpi_checkpoint(tmp_path / "c")
    tensors = load_file(path / "model.safetensors")
    gone = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    also_gone = "state_proj.bias"
    del tensors[gone], tensors[also_gone]
    tensors["some.extra.weight"] = tensors["action_in_proj.bias"].clone()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        _load(path)
    message = str(err.value)
    assert gone in message and also_gone in message and "missing 2" in message
    assert "some.extra.weight" in message and "unexpected 1" in message


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    path = write_tiny_openpi_checkpoint(tmp_path / "c")
    tensors = load_file(path / "model.safetensors")
    tensors["action_out_proj.bias"] = tensors["action_out_proj.bias"][:16].clone()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"action_out_proj\.bias: file \[16\], model \[32\]"):
        _load(path)


def test_embedding_alias_accepted(tmp_path: Path) -> None:
    """openpi files store the tied embedding as lm_head.weight; the embed_tokens name is accepted too."""
    path = write_tiny_openpi_checkpoint(tmp_path / "c")
    reference = _load(path).predict(_obs()).actions
    tensors = load_file(path / "model.safetensors")
    tensors[ckpt.EMBED_ALIAS] = tensors.pop(ckpt.EMBED_KEY)
    save_file(tensors, str(path / "model.safetensors"))
    np.testing.assert_array_equal(_load(path).predict(_obs()).actions, reference)


def test_lerobot_reads_embed_tokens_over_the_lm_head(tmp_path: Path) -> None:
    """LeRobot's files (config.json and key layout as LeRobot 0.4 writes them) hold the PaliGemma
    embedding under both names; the LM head copy is never used, so only "embed_tokens" is read."""
    path = write_tiny_lerobot_checkpoint(tmp_path / "c", "pi0", with_tokenizer=True)
    tensors = load_file(path / "model.safetensors")
    assert {"model." + ckpt.EMBED_KEY, "model." + ckpt.EMBED_ALIAS} <= set(tensors)
    reference = _load(path).predict(_obs()).actions
    original = tensors["model." + ckpt.EMBED_KEY]
    tensors["model." + ckpt.EMBED_KEY] = torch.randn_like(original)
    save_file(tensors, str(path / "model.safetensors"))
    np.testing.assert_array_equal(_load(path).predict(_obs()).actions, reference)
    # a file with the lm_head name only still loads, from it
    tensors["model." + ckpt.EMBED_KEY] = tensors.pop("model." + ckpt.EMBED_ALIAS)
    save_file(tensors, str(path / "model.safetensors"))
    np.testing.assert_array_equal(_load(path).predict(_obs()).actions, reference)


def test_pi05_prompt_state_padded_is_opt_in(openpi_pi05: Path) -> None:
    """Default: the unpadded normalised state in the prompt (openpi); VLA_PI05_PROMPT_STATE=padded:
    zero-padded to the model's 32 dims first (LeRobot 0.4.0-0.4.4 fine-tunes)."""
    joints = np.linspace(-1, 1, 7).astype(np.float32)
    stats = tiny_norm_stats()["state"]
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    normalized = (joints - q01) / (q99 - q01 + 1e-6) * 2 - 1

    def prompt(policy: Pi0Policy) -> str:
        x = policy.prepare(_obs(joint_positions=joints, instruction="open it")).inputs
        return str(policy.loaded.tokenizer.decode(x.tokens[1 : int(x.token_mask.sum())].tolist()))

    unpadded = " ".join(str(b) for b in discretize_state(normalized))
    padded_state = np.zeros(32, np.float32)
    padded_state[:7] = normalized
    padded = " ".join(str(b) for b in discretize_state(padded_state))
    assert len(padded.split()) == 32 and padded.endswith(" 128 128")
    assert prompt(_load(openpi_pi05)) == f"Task: open it, State: {unpadded};\nAction: "
    padded_prompt = prompt(_load(openpi_pi05, pi05_prompt_state="padded"))
    assert padded_prompt == f"Task: open it, State: {padded};\nAction: "
    # Only the prompt changes: the continuous state input stays the same.
    a = _load(openpi_pi05).prepare(_obs(joint_positions=joints)).inputs.state
    b = _load(openpi_pi05, pi05_prompt_state="padded").prepare(_obs(joint_positions=joints)).inputs.state
    np.testing.assert_array_equal(a, b)


def test_variant_read_from_config_and_checked_against_weights(tmp_path: Path) -> None:
    path = write_tiny_openpi_checkpoint(tmp_path / "c", "pi05")
    config = json.loads((path / "config.json").read_text())
    # openpi's own converter writes no "pi05": the weights decide (time_mlp_* = pi0.5)
    del config["pi05"]
    (path / "config.json").write_text(json.dumps(config))
    assert _load(path).config.pi05
    config["pi05"] = False
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"pi05=false but the weights are a pi0\.5 model"):
        _load(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        _load(tmp_path / "empty")


# ---- norm stats / embodiments -----------------------------------------------------------------


def test_embodiment_selects_the_asset(openpi_pi0: Path) -> None:
    policy = _load(openpi_pi0)
    info = policy.model_info
    assert info.embodiments == ("arm_a", "arm_b") and info.default_embodiment == "arm_a"
    a = policy.predict(_obs(embodiment="arm_a")).actions
    b = policy.predict(_obs(embodiment="arm_b")).actions
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(policy.predict(_obs()).actions, a)
    with pytest.raises(InvalidObservation) as err:
        policy.prepare(_obs(embodiment="arm_c"))
    assert err.value.field == "embodiment_tag"


def test_norm_stats_key_override(openpi_pi0: Path) -> None:
    policy = _load(openpi_pi0, norm_stats_key="arm_b")
    assert policy.model_info.embodiments == ("arm_b",) and policy.model_info.default_embodiment == "arm_b"
    with pytest.raises(ModelLoadError, match="arm_a, arm_b"):
        _load(openpi_pi0, norm_stats_key="arm_x")


def test_action_dim_setting_must_agree_with_stats(openpi_pi0: Path) -> None:
    assert _load(openpi_pi0, action_dim=7).model_info.action_dim == 7
    with pytest.raises(ModelLoadError, match="VLA_ACTION_DIM=6"):
        _load(openpi_pi0, action_dim=6)


def test_no_stats_uses_action_dim_setting(tmp_path: Path) -> None:
    path = write_tiny_openpi_checkpoint(tmp_path / "c", asset_ids=())
    policy = _load(path, action_dim=4)
    info = policy.model_info
    assert info.action_dim == 4 and info.state_dims == {"default": 4} and info.embodiments == ("default",)
    assert policy.predict(_obs(joint_positions=np.zeros(4, np.float32))).actions.shape == (16, 4)


def _finish_known(policy: Pi0Policy, embodiment: str) -> tuple[np.ndarray, np.ndarray]:
    horizon, dim = policy.config.action_horizon, policy.config.action_dim
    raw_actions = np.tile(np.linspace(-1.0, 1.0, dim, dtype=np.float32), (horizon, 1))
    raw_actions[1] *= 0.5
    raw = Raw(raw_actions, 1.0)
    sample = PreparedSample(inputs=None, embodiment=embodiment, seed=0)
    pred = policy.finish(raw, sample)
    assert pred.confidence == 1.0 and pred.model_actions is raw_actions
    return raw_actions, pred.actions


def test_unnormalise_pi0_zscore(openpi_pi0: Path) -> None:
    policy = _load(openpi_pi0, chunk_size=3)
    raw, actions = _finish_known(policy, "arm_b")
    stats = tiny_norm_stats(7, 7, index=1)["actions"]  # arm_b is the second asset
    mean, std = np.array(stats["mean"]), np.array(stats["std"])
    expected = raw[:3, :7] * (std + 1e-6) + mean
    np.testing.assert_allclose(actions, expected, rtol=1e-6, atol=1e-6)
    # hand-computed spot check: first action, first dim: -1 * (0.5 + 0.2 + 1e-6) + (-0.7 + 1)
    assert actions[0, 0] == pytest.approx(-1 * 0.700001 + 0.3, abs=1e-6)


def test_unnormalise_pi05_quantiles(openpi_pi05: Path) -> None:
    policy = _load(openpi_pi05, chunk_size=2)
    raw, actions = _finish_known(policy, "demo")
    stats = tiny_norm_stats(7, 7)["actions"]
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    expected = (raw[:2, :7] + 1) / 2 * (q99 - q01 + 1e-6) + q01
    np.testing.assert_allclose(actions, expected, rtol=1e-6, atol=1e-6)
    assert actions[0, 0] == pytest.approx(q01[0], abs=1e-6)  # -1 maps to q01


def test_unnormalise_lerobot_mean_std(tmp_path: Path) -> None:
    path = write_tiny_lerobot_checkpoint(tmp_path / "c", "pi0")
    policy = _load(path, tokenizer_path=str(demo_tokenizer_path()), chunk_size=2)
    raw, actions = _finish_known(policy, "default")
    stats = tiny_norm_stats(7, 7)["actions"]
    expected = raw[:2, :7] * np.array(stats["std"]) + np.array(stats["mean"])  # LeRobot: x * std + mean
    np.testing.assert_allclose(actions, expected, rtol=1e-6, atol=1e-6)


def test_confidence_from_last_step(openpi_pi0: Path) -> None:
    policy = _load(openpi_pi0)
    horizon, dim = policy.config.action_horizon, policy.config.action_dim
    velocity = np.zeros((horizon, dim), np.float32)
    velocity[:, :7] = 2.0  # |dt| * v = 0.2 everywhere in the robot dims
    velocity[:, 7:] = 100.0  # padded dims do not count
    rows, dims = policy.model_info.chunk_size, policy.action_width(PreparedSample(None, "arm_a", 0))
    assert dims == 7
    assert flow.confidence(velocity, 0.1, rows, dims) == pytest.approx(1 / 1.2)


# ---- preprocessing ----------------------------------------------------------------------------


def test_prepare_cameras_masks_and_images(openpi_pi0: Path) -> None:
    policy = _load(openpi_pi0)
    wrist = np.zeros((100, 200, 3), np.uint8)
    wrist[:, :, 0] = 255
    sample = policy.prepare(_obs(images={"wrist": wrist}))  # alias of left_wrist
    x = sample.inputs
    assert x.images.shape == (3, 3, 224, 224) and x.images.dtype == np.float32
    assert x.image_masks.tolist() == [False, True, False]
    assert np.all(x.images[0] == 0) and np.all(x.images[2] == 0)  # missing cameras: zeros
    # 200x100 -> 224x112 centred: rows 56..167 hold the image, the rest is black padding (-1)
    red, green = x.images[1, 0], x.images[1, 1]
    assert red[112, 112] == pytest.approx(1.0) and green[112, 112] == pytest.approx(-1.0)
    assert red[10, 112] == pytest.approx(-1.0) and red[220, 112] == pytest.approx(-1.0)
    assert sample.batch_key == ("pi0",) and sample.seed == 0 and sample.embodiment == "arm_a"


def test_prepare_rejects_bad_cameras(openpi_pi0: Path) -> None:
    policy = _load(openpi_pi0)
    for images in ({"top": np.zeros((8, 8, 3), np.uint8)}, {}, {"base": np.zeros((8, 8), np.uint8)}):
        with pytest.raises(InvalidObservation) as err:
            policy.prepare(_obs(images=images))
        assert err.value.field == "cameras"
    with pytest.raises(InvalidObservation, match=r"'top'.*base, left_wrist, right_wrist"):
        policy.prepare(_obs(images={"top": np.zeros((8, 8, 3), np.uint8)}))


def test_prepare_state_normalised_and_padded(openpi_pi0: Path) -> None:
    policy = _load(openpi_pi0)
    joints = np.arange(7, dtype=np.float32)
    x = policy.prepare(_obs(joint_positions=joints, embodiment="arm_a")).inputs
    stats = tiny_norm_stats()["state"]
    expected = (joints - np.array(stats["mean"])) / (np.array(stats["std"]) + 1e-6)
    assert x.state.shape == (32,)
    np.testing.assert_allclose(x.state[:7], expected, rtol=1e-6)
    assert np.all(x.state[7:] == 0)
    with pytest.raises(InvalidObservation) as err:
        policy.prepare(_obs(joint_positions=np.zeros(6, np.float32)))
    assert err.value.field == "joint_positions"


def test_prepare_tokens_pi0(openpi_pi0: Path) -> None:
    policy = _load(openpi_pi0)
    sp = policy.loaded.tokenizer
    x = policy.prepare(_obs(instruction="  pick_up the\ncup ")).inputs
    n = int(x.token_mask.sum())
    assert x.tokens.shape == x.token_mask.shape == (48,)
    assert x.token_mask[:n].all() and not x.token_mask[n:].any() and np.all(x.tokens[n:] == 0)
    ids = x.tokens[:n].tolist()
    assert ids[0] == sp.bos_id() and ids[-1] == sp.piece_to_id("\n")
    assert sp.decode(ids[1:-1]) == "pick up the cup"


def test_prepare_tokens_pi05_state_in_prompt(openpi_pi05: Path) -> None:
    policy = _load(openpi_pi05)
    joints = np.linspace(-1, 1, 7).astype(np.float32)
    x = policy.prepare(_obs(joint_positions=joints, instruction="open it")).inputs
    stats = tiny_norm_stats()["state"]
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    normalized = (joints - q01) / (q99 - q01 + 1e-6) * 2 - 1
    bins = " ".join(str(b) for b in discretize_state(normalized))
    ids = x.tokens[: int(x.token_mask.sum())].tolist()
    assert policy.loaded.tokenizer.decode(ids[1:]) == f"Task: open it, State: {bins};\nAction: "
    assert x.tokens.shape == (200,)
    assert discretize_state(np.array([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 2.0])).tolist() == [
        -1,
        0,
        0,
        128,
        255,
        255,
        255,
    ]


def test_prepare_rejects_a_prompt_over_the_token_limit(openpi_pi0: Path) -> None:
    """The model's own limit (max_token_len); VLA_MAX_INSTRUCTION_CHARS is the transport's
    (test_server_api)."""
    policy = _load(openpi_pi0)
    with pytest.raises(InvalidObservation) as err:
        policy.prepare(_obs(instruction="put the cup on the plate " * 10))
    assert err.value.field == "language_instruction" and "48" in err.value.message


# ---- the embedded demo ------------------------------------------------------------------------


def test_demo_model_loads_through_the_checkpoint_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLA_CACHE_DIR", str(tmp_path))
    policy = Pi0Policy(Settings(embedded_model="random"))
    policy.load("", "cpu")
    info = policy.model_info
    assert info.demo and "random weights" in info.name and info.family == "pi0"
    assert info.action_dim == 7 and info.state_dims == {"demo": 7} and info.chunk_size == 16
    (written,) = tmp_path.glob("pi0-demo-*")
    assert (written / "model.safetensors").is_file() and (written / "assets/demo/norm_stats.json").is_file()
    pred = policy.predict(policy.warmup_observation())
    assert pred.actions.shape == (16, 7) and np.isfinite(pred.actions).all()
    # a second server reuses the files and gets the same model
    again = Pi0Policy(Settings(embedded_model="random"))
    again.load(None, "cpu")
    assert list(tmp_path.glob("pi0-demo-*")) == [written]
    np.testing.assert_array_equal(again.predict(policy.warmup_observation()).actions, pred.actions)


def test_demo_cache_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("VLA_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(ModelLoadError, match="VLA_CACHE_DIR"):
        Pi0Policy(Settings(embedded_model="random")).load("", "cpu")


def test_lower_precision_on_cpu_when_asked(openpi_pi05: Path) -> None:
    reference = _load(openpi_pi05).predict(_obs()).actions
    policy = _load(openpi_pi05, dtype="bfloat16")
    assert policy.model_info.dtype == "bfloat16" and _load(openpi_pi05).model_info.dtype == "float32"
    actions = policy.predict(_obs()).actions
    assert actions.dtype == np.float32 and np.isfinite(actions).all()
    np.testing.assert_allclose(actions, reference, atol=0.1)  # bf16 rounding only


def test_bfloat16_weights_on_disk_load_as_float32(tmp_path: Path) -> None:
    """openpi converts with precision=bfloat16 (some norms kept float32): mixed dtypes on disk are fine."""
    path = write_tiny_openpi_checkpoint(tmp_path / "c")
    reference = _load(path).predict(_obs()).actions
    tensors = load_file(path / "model.safetensors")
    mixed = {k: (v if "norm" in k else v.to(torch.bfloat16)) for k, v in tensors.items()}
    save_file(mixed, str(path / "model.safetensors"))
    policy = _load(path)
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    np.testing.assert_allclose(policy.predict(_obs()).actions, reference, atol=0.1)


def test_lerobot_camera_names_follow_its_image_features(tmp_path: Path) -> None:
    path = write_tiny_lerobot_checkpoint(tmp_path / "c", "pi0")
    config = json.loads((path / "config.json").read_text())
    features = config["input_features"]
    for slot in ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"):
        del features[f"observation.images.{slot}"]
    features["observation.images.top"] = {"type": "VISUAL", "shape": [3, 224, 224]}
    features["observation.images.wrist"] = {"type": "VISUAL", "shape": [3, 224, 224]}
    (path / "config.json").write_text(json.dumps(config))
    policy = _load(path, tokenizer_path=str(demo_tokenizer_path()))
    assert policy.model_info.camera_names == ("top", "wrist")
    x = policy.prepare(_obs(images={"wrist": np.zeros((10, 10, 3), np.uint8)})).inputs
    assert x.image_masks.tolist() == [False, True]
    assert policy.predict(_obs(images={"top": np.zeros((10, 10, 3), np.uint8)})).actions.shape == (16, 7)
    with pytest.raises(InvalidObservation):
        policy.prepare(_obs())  # "base" is not one of this checkpoint's cameras

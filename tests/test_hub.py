import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctrl_offline.reports.hub import HubError, ModelCardInfo, push_adapter, render_model_card
from hub_standin import StandInHub

TESTS = Path(__file__).parent


def make_adapter(folder: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/tmp/local/base",
                                                            "peft_type": "LORA", "r": 16}))
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 128)
    (folder / "tokenizer.json").write_text("{}")
    return folder


PUSH = """
import json, sys
from ctrl_offline.reports.hub import ModelCardInfo, push_adapter
info = ModelCardInfo(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", dataset="Anthropic/hh-rlhf", k=8,
                     reward_model="rm", transform="exp", t=12.6, beta=0.31, phi_scale=3.07e5, unscaled_beta=9.5e4,
                     inference="bon", n=4, kl=0.42,
                     win_rates=[{"selector": "bon", "n": 4, "value": 0.61, "ci_low": 0.55, "ci_high": 0.67}],
                     command="accelerate launch recipes/hh_bon.py --config recipes/configs/hh_bon.yaml")
print(push_adapter(sys.argv[1], "me/ctrl-bon4", info, private=True, revision=sys.argv[2] or None))
"""


def run_push(adapter, hub_url, token, revision=""):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(adapter.parent / "hf_home"),
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    env.pop("HF_HUB_OFFLINE", None)  # the stand-in is local: requests to it are allowed
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-c", PUSH, str(adapter), revision], env=env, capture_output=True,
                          text=True, timeout=120)


def test_push_uploads_adapter_card_and_fixed_base_model(tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    with StandInHub() as hub:
        proc = run_push(adapter, hub.url, "hf_secret_token_123", revision="v1")
        assert proc.returncode == 0, proc.stderr
        files = hub.committed_files()
        paths = [r["path"] for r in hub.requests]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = files["README.md"].decode()
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in card and "| t | `12.6` |" in card
    assert "| β (`beta`, for Φ rescaled to span 1) | `0.31` |" in card and "| raw-Φ β (`unscaled_beta`) | `9.5e+04` |" in card
    assert "| bon | 4 | 0.610 | [0.550, 0.670] |" in card and "accelerate launch recipes/hh_bon.py" in card
    assert "/api/repos/create" in paths[0] and any("/branch/v1" in p for p in paths)
    assert any("/commit/v1" in p for p in paths)
    # The token authenticates the requests and appears nowhere else: not in output, not in files.
    assert all(r["auth"] == "Bearer hf_secret_token_123" for r in hub.requests if r["method"] == "POST")
    assert "hf_secret_token_123" not in proc.stdout + proc.stderr
    assert all(b"hf_secret_token_123" not in content for content in files.values())
    # The local adapter folder is left as it was.
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "/tmp/local/base"


def test_push_without_a_token_fails_before_any_request(tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    with StandInHub() as hub:
        proc = run_push(adapter, hub.url, token=None)
        assert proc.returncode != 0
        assert "no Hugging Face token" in proc.stderr
        assert hub.requests == []


def test_push_refuses_a_folder_without_an_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="not a PEFT adapter folder"):
        push_adapter(tmp_path / "empty", "me/x", ModelCardInfo(base_model="b"))


def test_card_without_evaluation():
    card = render_model_card(ModelCardInfo(base_model="org/base"), "me/plain")
    assert card.startswith("---\nbase_model: \"org/base\"") and "## Evaluation" not in card


def test_card_shows_both_betas_and_the_scale():
    card = render_model_card(ModelCardInfo(base_model="org/base", transform="exp", t=12.6, beta=0.31, phi_scale=3.07e5,
                                           unscaled_beta=9.5e4), "me/ctrl")
    assert "| β (`beta`, for Φ rescaled to span 1) | `0.31` |" in card
    assert "| Φ scale (`phi_scale`) | `3.07e+05` |" in card
    assert "| raw-Φ β (`unscaled_beta`) | `9.5e+04` |" in card
    assert "`unscaled_beta` = beta × phi_scale is the same policy's β for the raw Φ" in card
    # Without unscaled_beta it follows from the other two.
    card = render_model_card(ModelCardInfo(base_model="org/base", beta=0.5, phi_scale=4.0), "me/ctrl")
    assert "| raw-Φ β (`unscaled_beta`) | `2` |" in card


def test_card_of_an_adapter_written_by_ctrl_data_train(tmp_path):
    """`ctrl-data train` leaves ctrl_build.json and ctrl_train.json beside the adapter: the card reads them."""
    from ctrl_offline.reports.hub import card_info_from_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/local/copy"}))
    (tmp_path / "ctrl_train.json").write_text(json.dumps({"base_model": "org/base", "loss": "dpo"}))
    (tmp_path / "ctrl_build.json").write_text(json.dumps({
        "transform": "exp", "t": 12.5, "beta": 0.31, "phi_scale": 2.0, "unscaled_beta": 0.62, "k": 8,
        "planner": {"inference": "bon", "n": 4, "kl": 0.5}}))
    report = {"kl": {"value": 0.49}, "win_rates": [{"selector": "bon", "n": 4, "value": 0.8, "ci_low": 0.7,
                                                    "ci_high": 0.9}]}
    info = card_info_from_adapter(tmp_path, report)
    assert (info.base_model, info.transform, info.t, info.beta, info.k, info.inference, info.n, info.kl) == \
        ("org/base", "exp", 12.5, 0.31, 8, "bon", 4, 0.49)
    card = render_model_card(info, "me/ctrl")
    assert "**best-of-N with N = 4**" in card and "| β (`beta`, for Φ rescaled to span 1) | `0.31` |" in card
    assert "| bon | 4 | 0.800 | [0.700, 0.900] |" in card

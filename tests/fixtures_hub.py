"""The `hub` fixture: a fresh local Hub-compatible server per test, with the unmodified huggingface_hub pointed at it.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import (conftest.py imports
transformers first), so besides the environment (for subprocesses) the fixture sets the module values
that are read at call time: `constants.ENDPOINT`, `HUGGINGFACE_CO_URL_TEMPLATE`, `HF_HUB_CACHE`,
`HF_HUB_OFFLINE`, `HF_TOKEN_PATH`, the endpoint of the module-level `HfApi` behind
`huggingface_hub.create_repo`/`upload_folder`, and transformers' cached `HfApi`. Everything is restored
after the test. The cache starts empty in a temp folder; no token is set unless a test passes one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub_server import HubServer

TOKEN = "hf_test_user_token"
OTHER_TOKEN = "hf_test_someone_else"


@dataclass
class LocalHub:
    url: str
    server: HubServer
    cache_dir: Path
    token: str = TOKEN
    user: str = "user"

    @property
    def state(self):
        return self.server.state

    def set_offline(self, monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
        """What HF_HUB_OFFLINE=1 at import time would give (huggingface_hub and transformers both read this)."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that should use this hub (set before it imports huggingface_hub)."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(HF_ENDPOINT=self.url, HF_HUB_CACHE=str(self.cache_dir), HF_HUB_DISABLE_TELEMETRY="1", **extra)
        return env


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants, hf_api
    from transformers.utils import hub as transformers_hub

    from spp_hf.hub import cards

    server = HubServer(tokens={TOKEN: "user", OTHER_TOKEN: "someone"}).start()
    cache_dir = tmp_path / "hf-cache"
    url = server.url
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    cards.clear_base_metadata_cache()
    try:
        yield LocalHub(url=url, server=server, cache_dir=cache_dir)
    finally:
        cards.clear_base_metadata_cache()
        server.stop()

"""What the HTTP backends share: their servers, retries and counters (`http.HttpClient`)."""
from __future__ import annotations

import random
import time
from typing import Callable, ClassVar

from ..config import Settings, urls
from ..http import HttpClient
from .base import Backend


class RemoteBackend(Backend):
    """A backend whose model runs behind one or more HTTP servers (`url_setting`)."""

    url_setting: ClassVar[str] = ""
    service: ClassVar[str] = ""

    def __init__(self, settings: Settings, *, server_offset: int = 0,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None,
                 **client):
        super().__init__(settings)
        servers = urls(getattr(settings, self.url_setting))
        k = server_offset % len(servers)  # workers start at different servers
        self.http = HttpClient(servers[k:] + servers[:k], settings, backend=self.name,
                               service=self.service, url_setting=self.url_setting, sleep=sleep,
                               rng=rng, **client)

    @property
    def slots(self) -> int:
        return self.settings.EMBED_MAX_CONCURRENCY * len(self.http.pool)

    def stats(self) -> dict:
        return {**self.http.stats(), "route": self.route}

    def close(self) -> None:
        self.http.close()

"""The store's remote sources, made on first use and kept for its lifetime (one per source, sharing the store's
HTTP session)."""

from __future__ import annotations

import threading

import requests

from modelstore._sources import RemoteSource
from modelstore._sources.civitai import CivitaiSource
from modelstore.air import Source
from modelstore.settings import StoreSettings


class SourcePool:
    def __init__(self, settings: StoreSettings, session: requests.Session) -> None:
        self._settings = settings
        self._session = session
        self._sources: dict[Source, RemoteSource] = {}
        self._lock = threading.Lock()

    def get(self, source: Source) -> RemoteSource:
        with self._lock:
            if source not in self._sources:
                self._sources[source] = self._new(source)
            return self._sources[source]

    def _new(self, source: Source) -> RemoteSource:
        if source is Source.CIVITAI:
            return CivitaiSource(self._settings.civitai_api, self._settings.civitai_token, self._session)
        # Imported here: huggingface_hub (and its own HTTP stack) is only needed by those who use the Hub.
        from modelstore._sources.huggingface import HuggingFaceSource

        return HuggingFaceSource(self._settings.hf_endpoint, self._settings.hf_token)

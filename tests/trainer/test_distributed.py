"""``TWOTOWER_DIST_TIMEOUT_S``: the bound on joining the process group and on collectives."""

from __future__ import annotations

from datetime import timedelta

import pytest

from trainer.runtime.distributed import TIMEOUT_ENV, collective_timeout


def test_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() is None
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout() == timedelta(seconds=90)
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            collective_timeout()

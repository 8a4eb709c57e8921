"""One promotion of a model at a time: a file lock beside a sqlite store, a lease taken
through the registry itself on any other store."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

PROMOTION_LEASE_STALE_S = 900.0  # a lease unchanged this long was left by a dead promoter
PROMOTION_LEASE_WAIT_S = 1200.0  # give up waiting for another promotion after this long
LEASE_SUFFIX = ".promotion-lease"  # the registered model that is the lease of ``<name>``


class PromotionBusyError(RuntimeError):
    """Another promotion of the same model held the lease longer than we could wait."""


@contextlib.contextmanager
def promotion_lock(
    client: MlflowClient, uri: str, name: str, wait_s: float = PROMOTION_LEASE_WAIT_S
) -> Iterator[None]:
    """Serialise the promotions of model ``name``, so two processes cannot both read the old
    champion and the worse candidate win by writing last.

    On a sqlite store: an exclusive lock on a file beside the database (released by the OS
    if the holder dies). On any other store (a tracking server, a database URI): a lease
    taken through the registry itself, see :func:`registry_lease`.

    Raises:
        PromotionBusyError: another promotion held the lock or lease for more than ``wait_s``.
    """
    if not uri.startswith("sqlite:///"):
        with registry_lease(client, name, wait_s=wait_s):
            yield
        return
    import fcntl

    database = Path(uri.removeprefix("sqlite:///"))
    lock = database.with_name(f"{database.name}.{name}.promotion.lock")
    with open(lock, "a") as handle:

        def locked() -> bool:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        _wait_for(
            locked, wait_s, lambda: f"another promotion of {name} held {lock} for more than "
            f"{wait_s:.0f} s",
        )  # fmt: skip
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for(acquire: Callable[[], bool], wait_s: float, busy: Callable[[], str]) -> None:
    """Call ``acquire`` until it returns True, pausing 50-150 ms between tries.

    Raises:
        PromotionBusyError: with ``busy()`` as its message, after ``wait_s`` seconds.
    """
    deadline = time.monotonic() + wait_s
    while not acquire():
        if time.monotonic() > deadline:
            raise PromotionBusyError(busy())
        time.sleep(0.05 + 0.1 * random.random())


@contextlib.contextmanager
def registry_lease(
    client: MlflowClient,
    name: str,
    stale_after_s: float = PROMOTION_LEASE_STALE_S,
    wait_s: float = PROMOTION_LEASE_WAIT_S,
) -> Iterator[None]:
    """Hold the lease of ``name``: the registered model ``<name>.promotion-lease``.

    Creating a registered model is atomic on every MLflow store (the name is the store's
    primary key), so exactly one of several concurrent creators succeeds: that is the
    compare-and-set the registry API offers. The holder deletes it when done. A lease whose
    holder died is broken once the same holder has been seen for ``stale_after_s`` (measured
    on this machine's clock, so clock skew between hosts does not matter).

    Raises:
        PromotionBusyError: the lease stayed with live holders for more than ``wait_s``.
    """
    lease = f"{name}{LEASE_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    seen: list[tuple[str | None, float]] = [(None, 0.0)]  # (holder, when we first saw it)

    def taken() -> bool:
        try:
            client.create_registered_model(
                lease, tags={"holder": holder},
                description=f"held while {holder} promotes {name}; delete it if that process died",
            )  # fmt: skip
            return True
        except MlflowException as exc:
            # taken; or, from a server that looks the lease up after the failed insert, just
            # released by its holder: either way try again
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        other, now = _lease_holder(client, lease), time.monotonic()
        if other is None or seen[0][0] != other:
            seen[0] = (other, now)
        elif now - seen[0][1] > stale_after_s:
            logger.warning("breaking the promotion lease of %s left by %s (held > %.0f s)",
                           name, other, stale_after_s)  # fmt: skip
            if _lease_holder(client, lease) == other:
                _delete_lease(client, lease)
            seen[0] = (None, now)
        return False

    _wait_for(
        taken, wait_s, lambda: f"{name}: another promotion ({seen[0][0]}) held the lease "
        f"{lease!r} for more than {wait_s:.0f} s; if that process died, delete the registered "
        f"model {lease!r}",
    )  # fmt: skip
    try:
        yield
    finally:
        _delete_lease(client, lease)


def _lease_holder(client: MlflowClient, lease: str) -> str | None:
    """The holder recorded on the lease, or None if it is gone."""
    try:
        return (client.get_registered_model(lease).tags or {}).get("holder", "?")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise


def _delete_lease(client: MlflowClient, lease: str) -> None:
    try:
        client.delete_registered_model(lease)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise

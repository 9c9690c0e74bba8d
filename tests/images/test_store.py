"""The image store: images by content hash, kept for a time, held while used, within a quota, and on disk across
restarts; nothing half-written."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable

import pytest
from PIL import Image

from server.core.errors import BadImage, ImageNotFound, ImageStoreFull
from server.images import ImageStore

from .conftest import Clock, files_in
from .pictures import encoded, png_claiming


def test_a_stored_image_is_found_by_its_reference(store: ImageStore, clock: Clock) -> None:
    data = encoded(64, 48, "WEBP")
    stored = store.put_bytes(data, keep_for_s=600)
    assert stored.reference == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (stored.width, stored.height, stored.mime_type) == (64, 48, "image/webp")
    assert stored.expires_at == clock.now + 600
    assert store.find(stored.reference) == stored
    assert stored.path.read_bytes() == data  # the worker reads this file
    with Image.open(stored.path) as image:
        assert image.size == (64, 48)


def test_the_same_bytes_twice_are_one_image_kept_until_the_later_expiry(store: ImageStore, clock: Clock) -> None:
    data = encoded()
    first = store.put_bytes(data, keep_for_s=600)
    clock.advance(100)
    second = store.put_bytes(data, keep_for_s=60)  # asks for less than is left: the longer time stands
    assert second.reference == first.reference and second.expires_at == first.expires_at
    third = store.put_bytes(data, keep_for_s=3000)
    assert third.expires_at == clock.now + 3000
    assert store.find(first.reference).expires_at == third.expires_at
    assert store.used_bytes == len(data)
    assert files_in(store) == sorted([third.path.name, third.path.name + ".json"])


def test_the_time_kept_is_the_default_unless_asked_and_never_beyond_the_limit(store: ImageStore, clock: Clock) -> None:
    assert store.put_bytes(encoded(color="red")).expires_at == clock.now + 3600
    assert store.put_bytes(encoded(color="blue"), keep_for_s=0).expires_at == clock.now + 3600
    assert store.put_bytes(encoded(color="green"), keep_for_s=7 * 86400).expires_at == clock.now + 86400
    with pytest.raises(BadImage, match="negative"):
        store.put_bytes(encoded(color="white"), keep_for_s=-1)


def test_an_expired_image_is_not_found_and_its_files_are_deleted(store: ImageStore, clock: Clock) -> None:
    stored = store.put_bytes(encoded(), keep_for_s=60)
    clock.advance(60)
    with pytest.raises(ImageNotFound) as caught:
        store.find(stored.reference)
    assert caught.value.reference == stored.reference
    assert store.sweep() == 1
    assert files_in(store) == [] and store.used_bytes == 0


def test_a_put_sweeps_what_expired(store: ImageStore, clock: Clock) -> None:
    old = store.put_bytes(encoded(color="red"), keep_for_s=60)
    clock.advance(61)
    new = store.put_bytes(encoded(color="blue"), keep_for_s=60)
    assert not old.path.exists() and new.path.exists()


def test_images_survive_a_restart_within_their_time_and_not_after(
    open_store: Callable[..., ImageStore], clock: Clock
) -> None:
    stored = open_store().put_bytes(encoded(), keep_for_s=600)
    clock.advance(599)
    assert open_store().find(stored.reference) == stored
    clock.advance(1)
    restarted = open_store()  # sweeps at start what expired while it was down
    with pytest.raises(ImageNotFound):
        restarted.find(stored.reference)
    assert files_in(restarted) == []


def test_a_hold_keeps_an_expired_image_on_disk_until_it_ends(store: ImageStore, clock: Clock) -> None:
    stored = store.put_bytes(encoded(), keep_for_s=60)
    with store.hold([stored]), store.hold([stored]):  # two requests read it
        clock.advance(120)
        assert store.sweep() == 0 and stored.path.exists()
        with pytest.raises(ImageNotFound):  # but no new request may name it
            store.find(stored.reference)
        assert store.sweep_if_due() == 0 and stored.path.exists()
    assert store.sweep_if_due() == 1  # the next sweep, once the last hold ended
    assert not stored.path.exists() and files_in(store) == []


def test_a_hold_on_a_live_image_deletes_nothing(store: ImageStore, clock: Clock) -> None:
    stored = store.put_bytes(encoded(), keep_for_s=60)
    with store.hold([stored]):
        pass
    assert store.find(stored.reference) == stored


def test_an_image_over_the_byte_limit_is_refused_before_it_is_written(store: ImageStore) -> None:
    with pytest.raises(ImageStoreFull, match="at most 65536 bytes per image") as caught:
        store.put_bytes(b"\0" * (64 * 1024 + 1))
    assert caught.value.retry_after_s is None  # waiting never helps
    assert files_in(store) == []


def _noise_png(seed: int) -> bytes:
    """A PNG of about 40 KB (stored uncompressed), different for every seed."""
    image = Image.new("RGB", (128, 104))
    image.putpixel((0, 0), (seed, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


def test_over_the_quota_is_refused_with_the_time_until_room_is_made(store: ImageStore, clock: Clock) -> None:
    pngs = [_noise_png(seed) for seed in range(7)]
    assert 6 * len(pngs[0]) <= 256 * 1024 < 7 * len(pngs[0])  # six fit in the quota, seven do not
    stored = [store.put_bytes(png, keep_for_s=600 + i) for i, png in enumerate(pngs[:6])]
    before = files_in(store)
    with pytest.raises(ImageStoreFull, match="full") as caught:
        store.put_bytes(pngs[6])
    assert caught.value.retry_after_s == pytest.approx(600)  # when the first of them expires
    assert files_in(store) == before  # nothing of it was written
    clock.advance(601)  # the first expires: its room is the new one's
    assert store.put_bytes(pngs[6]).reference not in {s.reference for s in stored[1:]}
    assert not stored[0].path.exists()


def test_a_refused_image_leaves_no_file(store: ImageStore) -> None:
    for data in (b"not an image", encoded(kind="GIF"), png_claiming(100_000, 100_000), encoded(60, 48)):
        with pytest.raises(BadImage):
            store.put_bytes(data)
    assert files_in(store) == [] and store.used_bytes == 0


@pytest.mark.parametrize("reference", ["", "sha256:", "sha256:xyz", "md5:" + "0" * 64, "sha256:" + "0" * 63, "../x"])
def test_text_that_is_not_a_reference_is_refused(store: ImageStore, reference: str) -> None:
    with pytest.raises(BadImage, match="not an image reference"):
        store.find(reference)


def test_a_reference_never_stored_is_not_found(store: ImageStore) -> None:
    with pytest.raises(ImageNotFound):
        store.find("sha256:" + "0" * 64)


def test_at_start_leftovers_of_a_crash_are_removed(open_store: Callable[..., ImageStore]) -> None:
    store = open_store()
    kept = store.put_bytes(encoded(color="red"))
    orphan = store.put_bytes(encoded(color="blue"))
    orphan.path.with_suffix(".json").unlink()  # a crash between the image's rename and its record's
    damaged = store.put_bytes(encoded(color="green"))
    damaged.path.with_suffix(".json").write_text("{not json")
    restarted = open_store()
    assert restarted.find(kept.reference) == kept
    for gone in (orphan, damaged):
        with pytest.raises(ImageNotFound):
            restarted.find(gone.reference)
    assert files_in(restarted) == sorted([kept.path.name, kept.path.name + ".json"])


def test_a_record_says_what_the_header_said(store: ImageStore) -> None:
    stored = store.put_bytes(encoded(64, 48, "JPEG"), keep_for_s=600)
    record = json.loads(stored.path.with_suffix(".json").read_text())
    assert record["mime_type"] == "image/jpeg" and (record["width"], record["height"]) == (64, 48)
    assert record["size_bytes"] == stored.path.stat().st_size and record["expires_at"] == stored.expires_at

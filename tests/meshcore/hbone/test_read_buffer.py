"""The shared HBONE receive buffer: reused while nothing holds a view of it, set aside
while a queued write does, and taken back once that write is gone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshcore.hbone.transport import MAX_LENT_BUFFERS, _ReadBuffer


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    saved = (_ReadBuffer.current, list(_ReadBuffer.lent))
    _ReadBuffer.current, _ReadBuffer.lent = None, []
    yield
    _ReadBuffer.current, _ReadBuffer.lent = saved[0], saved[1]


def test_the_same_buffer_serves_every_read_until_lent() -> None:
    first = id(_ReadBuffer.get())
    assert id(_ReadBuffer.get()) == first


def test_a_lent_buffer_is_not_reused_while_a_view_of_it_lives() -> None:
    queued = memoryview(_ReadBuffer.get())[100:200]  # what a slow app's transport keeps
    first = id(queued.obj)
    _ReadBuffer.lend()
    second = _ReadBuffer.get()
    second_id = id(second)
    assert second_id != first
    second[100:200] = b"x" * 100  # the next read fills the new buffer...
    assert bytes(queued) == bytes(100)  # ...and the queued bytes are untouched
    del second
    _ReadBuffer.lend()
    # The second buffer has no view left: taken back rather than a third allocated.
    assert id(_ReadBuffer.get()) == second_id
    assert [id(b) for b in _ReadBuffer.lent] == [first]  # still set aside for its view
    _ReadBuffer.lend()
    del queued
    # Both are free now: the next buffer is one of them, not a new one.
    assert id(_ReadBuffer.get()) in (first, second_id)


def test_set_aside_buffers_are_bounded() -> None:
    views = []
    for _ in range(MAX_LENT_BUFFERS + 5):
        views.append(memoryview(_ReadBuffer.get())[:1])
        _ReadBuffer.lend()
    assert len(_ReadBuffer.lent) == MAX_LENT_BUFFERS

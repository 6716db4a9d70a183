"""Pieces of the event log that the end-to-end tests reach only at their edges."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from analytics.peers import RequestIds
from analytics.stdout import _line_chunks


@pytest.mark.parametrize("size", [1, 5, 9, 10, 11, 64, 1000])
def test_line_chunks_are_whole_lines_within_the_size(size):
    """A batch larger than the pipe is cut only between lines, each piece within the size unless one line is longer."""
    data = b"".join(b"x" * length + b"\n" for length in (3, 9, 0, 20, 4, 4, 1))
    chunks = [bytes(chunk) for chunk in _line_chunks(data, size)]
    assert b"".join(chunks) == data
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= size or chunk.count(b"\n") == 1


def test_request_ids_are_unique_across_threads():
    """Threads asking a fresh generator at once all get distinct ids (gthread workers do this)."""
    ids = RequestIds()
    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(pool.map(lambda _: [ids.new() for _ in range(2000)], range(8)))
    every = [request_id for batch in batches for request_id in batch]
    assert len(set(every)) == len(every) == 16000
    assert {len(request_id) for request_id in every} == {32}


def test_forked_process_gets_its_own_request_ids():
    """A worker forked from a process that already made ids (gunicorn --preload) does not repeat them."""
    ids = RequestIds()
    parent = ids.new()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write_end, ids.new().encode())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 100).decode()
    os.waitpid(pid, 0)
    os.close(read_end)
    assert len(child) == 32 and child[:16] != parent[:16]

"""Who sent a request: addresses are addresses, proxies are believed only when trusted, ids say nothing."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from analytics.peers import Peers, new_request_id

PEERS = Peers(["127.0.0.1", "::1", "10.0.0.0/8"])


@pytest.mark.parametrize(
    ("remote", "forwarded", "client_ip"),
    [
        # Untrusted peers' headers are ignored.
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),
        # A trusted proxy's X-Forwarded-For is believed, to the nearest untrusted hop.
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),
        ("127.0.0.1", "198.51.100.1, 10.1.2.3", "198.51.100.1"),
        ("127.0.0.1", "192.0.2.7, 198.51.100.1, 10.1.2.3", "198.51.100.1"),
        # Junk is no address: the walk stops there and the last address before it stands.
        ("127.0.0.1", "not-an-ip", "127.0.0.1"),
        ("127.0.0.1", "198.51.100.1, <script>", "127.0.0.1"),
        ("127.0.0.1", "<script>, 10.1.2.3", "10.1.2.3"),
        ("127.0.0.1", "198.51.100.1" + "9" * 10_000, "127.0.0.1"),
        ("127.0.0.1", "", "127.0.0.1"),
        ("127.0.0.1", 'fe80::1%"<x>', "127.0.0.1"),
        # IPv4-mapped IPv6 is the IPv4 address, as a peer (trusted by 127.0.0.1) and as a hop.
        ("::ffff:127.0.0.1", "198.51.100.1", "198.51.100.1"),
        ("::ffff:203.0.113.9", "198.51.100.1", "203.0.113.9"),
        ("127.0.0.1", "::ffff:198.51.100.1", "198.51.100.1"),
        # Addresses are written in their one canonical form.
        ("127.0.0.1", "2001:DB8:0:0::1", "2001:db8::1"),
        # A peer that is not an address (a Unix socket gives "") has none.
        ("", "198.51.100.1", None),
    ],
)
def test_client_address(remote, forwarded, client_ip):
    """The logged client address is a parsed address, from trusted proxies only, junk falling back to the peer."""
    sender = PEERS.identify({"REMOTE_ADDR": remote, "HTTP_X_FORWARDED_FOR": forwarded})
    assert sender.client_ip == client_ip


@pytest.mark.parametrize(
    ("remote", "incoming", "kept"),
    [
        ("127.0.0.1", "nginx-req-1", True),
        ("203.0.113.9", "nginx-req-1", False),
        ("127.0.0.1", "bad id with spaces", False),
        ("127.0.0.1", "x" * 129, False),
    ],
)
def test_request_id_from_trusted_proxies_only(remote, incoming, kept):
    """A sane X-Request-ID from a trusted proxy is kept; anyone else's, or a strange one, is replaced."""
    sender = PEERS.identify({"REMOTE_ADDR": remote, "HTTP_X_REQUEST_ID": incoming})
    assert (sender.request_id == incoming) is kept
    assert len(sender.request_id) == (len(incoming) if kept else 32)


def test_request_ids_reveal_no_volume():
    """Consecutive ids share nothing a client could count with: no common prefix, no counter."""
    ids = [new_request_id() for _ in range(1000)]
    for earlier, later in zip(ids, ids[1:], strict=False):
        assert earlier[:8] != later[:8] and earlier[-8:] != later[-8:]
    assert len(set(ids)) == 1000


def test_request_ids_are_unique_across_threads_and_forks():
    """Threads at once, and a forked worker (gunicorn forks), never repeat an id."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(pool.map(lambda _: [new_request_id() for _ in range(2000)], range(8)))
    every = [request_id for batch in batches for request_id in batch]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its ids and leave at once
        os.write(write_end, "".join(new_request_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        child = reader.read()
    os.waitpid(pid, 0)
    every += [child[start : start + 32] for start in range(0, len(child), 32)]
    assert len(set(every)) == len(every) == 16100

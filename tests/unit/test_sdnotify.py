"""tracer.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""
from __future__ import annotations

import os
import socket

import pytest

from tracer import sdnotify


@pytest.fixture
def listener(tmp_path, monkeypatch):
    """A datagram socket in a tmp dir, named by $NOTIFY_SOCKET like systemd does."""
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield s
    s.close()


def test_not_under_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False


def test_unusable_socket_values(monkeypatch, tmp_path):
    # not an absolute path or abstract name; a path nobody listens on
    for value in ("", "relative/notify", str(tmp_path / "nobody")):
        monkeypatch.setenv("NOTIFY_SOCKET", value)
        assert sdnotify.notify("READY=1") is False


def test_helpers_send_the_protocol_messages(listener):
    assert sdnotify.ready() is True
    assert listener.recv(4096) == b"READY=1"
    assert sdnotify.status("attached 12 programs\nin 2 netns") is True
    assert listener.recv(4096) == b"STATUS=attached 12 programs in 2 netns"
    assert sdnotify.stopping() is True
    assert listener.recv(4096) == b"STOPPING=1"
    assert sdnotify.notify("WATCHDOG=1\nSTATUS=ok") is True
    assert listener.recv(4096) == b"WATCHDOG=1\nSTATUS=ok"


def test_abstract_socket(monkeypatch):
    name = f"pkttrace-test-{os.getpid()}-{id(monkeypatch)}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind("\0" + name)  # what systemd means by "@name"
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert s.recv(4096) == b"READY=1"
    finally:
        s.close()

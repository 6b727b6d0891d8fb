"""`free_port`: a rendezvous port no other job on the host can be handed by the kernel."""

from __future__ import annotations

import socket

from megadual.distributed.runtime import _ephemeral_port_floor, free_port


def test_free_port_is_bindable_and_below_the_ephemeral_range():
    # Below the range, a gloo listener or any outgoing connection (a bind to port 0) cannot be
    # handed the port between this check and the launcher's own bind.
    floor = _ephemeral_port_floor()
    ports = {free_port() for _ in range(20)}
    assert all(port < floor for port in ports), (ports, floor)
    assert len(ports) > 1  # drawn at random, not a fixed default that concurrent runs would share
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))

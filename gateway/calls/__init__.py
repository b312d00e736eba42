"""Calls: one :class:`~gateway.calls.call.Call` for every transport, its legs, and the live-call registry.

A carrier media socket, a ``/ws`` browser socket and a WebRTC peer are *legs*
(:class:`~gateway.calls.leg.Leg`): they move audio and events. Everything else a call is — the
conversation, the call log (recording, transcripts), the limits, the finaliser and call control —
lives once, in ``Call``.
"""

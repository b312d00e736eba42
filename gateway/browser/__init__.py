"""Browsers and apps: the ``/ws`` leg, the WebRTC leg and its audio track, the JSON events both
carry, and the softphone page."""

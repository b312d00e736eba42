"""Speech-to-speech calls: :mod:`pipeline.realtime.engine` (the call's engine over one OpenAI Realtime
session) and :mod:`pipeline.realtime.client` (the socket, the session's events). See the README's
"Speech-to-speech" section."""

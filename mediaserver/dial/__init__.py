"""``mediaserver dial``: a simulated Twilio caller for trying and measuring the server.

It posts the voice webhook as Twilio does, follows the TwiML to the Media
Stream, talks (WAV, offline TTS or a script) in real time, plays the agent's
audio as Twilio's buffer would (marks, clear), records both sides, and
reports what the caller experienced: time to first audio, turn latency,
barge-in reaction, gaps.

Modules: :mod:`.timeline` (the event log and the playback buffer, pure),
:mod:`.caller` (the Media Streams protocol from Twilio's side, sans I/O),
:mod:`.report` (figures from the log, pure), :mod:`.script` and
:mod:`.audio` (what the caller says), :mod:`.call` (the I/O) and
:mod:`.cli`.  Nothing here needs numpy except resampling unusual WAV rates
and ``--say``.
"""

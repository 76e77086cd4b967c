"""Realtime speech provider cores behind one provider-neutral interface.

:mod:`.base` holds the :class:`ProviderSession` protocol and the events and
commands the bridge exchanges with any provider (re-exported here); each
vendor module holds one sans-I/O session core (:mod:`.openai` today).
"""

from .base import (
    AudioDelta,
    AudioDone,
    AudioFormat,
    AudioTruncated,
    CancelResponse,
    CreateResponse,
    Other,
    ProviderCommand,
    ProviderError,
    ProviderEvent,
    ProviderSession,
    ResponseDone,
    ResponseStarted,
    SendAudio,
    SessionReady,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    ToolResult,
    Transcript,
    Truncate,
    Unknown,
    WireMessage,
)
from .openai import (
    FunctionTool,
    OpenAIRealtimeConfig,
    OpenAIRealtimeSession,
    SemanticVad,
    ServerVad,
)

__all__ = [
    "AudioDelta",
    "AudioDone",
    "AudioFormat",
    "AudioTruncated",
    "CancelResponse",
    "CreateResponse",
    "FunctionTool",
    "OpenAIRealtimeConfig",
    "OpenAIRealtimeSession",
    "Other",
    "ProviderCommand",
    "ProviderError",
    "ProviderEvent",
    "ProviderSession",
    "ResponseDone",
    "ResponseStarted",
    "SemanticVad",
    "SendAudio",
    "ServerVad",
    "SessionReady",
    "SpeechStarted",
    "SpeechStopped",
    "ToolCall",
    "ToolResult",
    "Transcript",
    "Truncate",
    "Unknown",
    "WireMessage",
]

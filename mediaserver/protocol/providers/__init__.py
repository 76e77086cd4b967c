"""Realtime speech provider cores behind one provider-neutral interface.

:mod:`.base` holds the :class:`ProviderSession` protocol and the events and
commands the bridge exchanges with any provider (re-exported here); each
vendor module holds one sans-I/O session core: :mod:`.openai`,
:mod:`.gemini`, :mod:`.assemblyai`, :mod:`.deepgram`, :mod:`.elevenlabs`,
and :mod:`.pcm` (our documented PCM16 WebSocket protocol).
"""

from .assemblyai import AssemblyAIAgentConfig, AssemblyAIAgentSession
from .base import (
    AudioDelta,
    AudioDone,
    AudioFormat,
    AudioTruncated,
    CancelResponse,
    CreateResponse,
    FunctionTool,
    Other,
    ProviderCommand,
    ProviderError,
    ProviderEvent,
    ProviderSession,
    ResponseDone,
    ResponseStarted,
    SendAudio,
    SendText,
    SessionReady,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    ToolCallsCancelled,
    ToolResult,
    Transcript,
    Truncate,
    Unknown,
    WireMessage,
)
from .deepgram import DeepgramAgentConfig, DeepgramAgentSession
from .elevenlabs import ElevenLabsConfig, ElevenLabsSession
from .gemini import GeminiLiveConfig, GeminiLiveSession
from .openai import (
    OpenAIRealtimeConfig,
    OpenAIRealtimeSession,
    SemanticVad,
    ServerVad,
)
from .pcm import PcmConfig, PcmSession

__all__ = [
    "AssemblyAIAgentConfig",
    "AssemblyAIAgentSession",
    "AudioDelta",
    "AudioDone",
    "AudioFormat",
    "AudioTruncated",
    "CancelResponse",
    "CreateResponse",
    "DeepgramAgentConfig",
    "DeepgramAgentSession",
    "ElevenLabsConfig",
    "ElevenLabsSession",
    "FunctionTool",
    "GeminiLiveConfig",
    "GeminiLiveSession",
    "OpenAIRealtimeConfig",
    "OpenAIRealtimeSession",
    "Other",
    "PcmConfig",
    "PcmSession",
    "ProviderCommand",
    "ProviderError",
    "ProviderEvent",
    "ProviderSession",
    "ResponseDone",
    "ResponseStarted",
    "SemanticVad",
    "SendAudio",
    "SendText",
    "ServerVad",
    "SessionReady",
    "SpeechStarted",
    "SpeechStopped",
    "ToolCall",
    "ToolCallsCancelled",
    "ToolResult",
    "Transcript",
    "Truncate",
    "Unknown",
    "WireMessage",
]

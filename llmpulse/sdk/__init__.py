"""The in-app SDK (light install: pydantic, confluent-kafka, PyYAML only).

`instrument(client)` wraps an official openai client; `record(...)` / `recorder(...)`
record calls made with any other library; `flush()` delivers what is queued;
`configure(...)` replaces the configuration read from the environment.
"""

from llmpulse.sdk.background import configure, flush, runtime
from llmpulse.sdk.instrument import instrument, uninstrument
from llmpulse.sdk.recorder import Recorder, record, recorder

__all__ = ["Recorder", "configure", "flush", "instrument", "record", "recorder", "runtime", "uninstrument"]

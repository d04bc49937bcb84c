"""The dashboard: a single page served by the daemon at ``/dashboard/`` (its files ship in
``static/``), and the live feed it reads, ``GET /v1.0/events``.

The feed is Server-Sent Events (``text/event-stream``), authenticated like the rest of
``/v1.0/`` (``Authorization: Bearer <admin token>``; a browser reads it with ``fetch``, since
``EventSource`` cannot send that field). Each event's ``data`` is one line of JSON in the admin
API's PascalCase. On connecting, a client is sent every section once; afterwards a section is
sent again only when it changed (sampled once a second, and at once after a configuration or
health change). A comment line (``: keep-alive``) goes out every 15 seconds of silence.

``hello``
    ``{"Version", "Worker", "StartedUtc", "BucketSeconds", "Buckets"}``, first and once.
``daemon``
    The body of ``GET /v1.0/health`` without ``Uptime``: counts of frontends and backends,
    ``ActiveRequests``, and ``Queues`` (one per frontend: ``Identifier``, ``QueueDepth``,
    ``PeakQueueDepth``, ``Queued``, ``ServedFromQueue``, ``TimedOut``, ``Rejected``,
    ``AverageQueueWaitMs``, ``MaxQueueWaitMs``, ``MissingBackends``).
``backends``
    ``GET /v1.0/backends/health`` without what changes at every check (``Uptime``,
    ``Downtime``, ``LastCheckUtc``, ``ConsecutiveSuccesses``): each backend's record
    (``Identifier``, ``Name``, ``Hostname``, ``Port``, ``MaxParallelRequests``, ``Active``...)
    with ``Healthy``, ``InRotation``, ``ActiveRequests``, ``ActiveRequestsByModel``,
    ``ConsecutiveFailures``, ``HealthySinceUtc`` or ``UnhealthySinceUtc``, ``LastError``,
    ``Frontends``, ``SteeredModels``. ``Active`` false is a drained backend.
``models``
    ``{backend identifier: GET /v1.0/backends/{id}/models}``: per model ``Name``, ``Present``,
    ``Loaded``, ``Required``, ``Size``, ``SizeVram`` (loaded ones), ``Pulling``
    (``Status``, ``Completed``, ``Total`` bytes, ``Queued``) and ``Failed`` (``Error``,
    ``Attempts``, ``NextRetryUtc``).
``frontends``
    ``GET /v1.0/frontends`` with each frontend's ``Queue`` (as in ``daemon``) and ``Recent``,
    its last 15 minutes: ``Requests``, ``Errors``, ``TooManyRequests`` (429s) and
    ``Backends`` (requests per backend identifier: where its requests went).
``series``
    ``{"BucketSeconds": 10, "EndUtc", "Backends": {identifier: {"Requests": [...],
    "Tokens": [...]}}}``: counts per 10-second bucket over the last 15 minutes, oldest first
    (90 each; tokens/s is ``Tokens[i] / BucketSeconds``). Only whole buckets: the last one
    ends at ``EndUtc``, and the section changes once per bucket.
``requests``
    An array of the latest finished client requests, oldest first: on connecting, and after
    catching up, the last 50 (a line may come twice; ``Id`` tells); then, once a second, those
    that finished since, the latest 50 at most (a page of lines is what a person reads; under
    thousands of requests a second the view is a sample of the latest):
    ``Time`` (UTC), ``Id``, ``Method``, ``Path``, ``Frontend``, ``Backend`` (the backends
    joined by commas for a request answered by several: a pull, the model catalog),
    ``Model``, ``Status``, ``Outcome``, ``DurationMs``, ``Tokens``, ``TokensPerSecond``,
    ``Key``.
``config``
    ``{"Generation"}``: the configuration changed (backends and frontends arrive in their own
    sections; anything else the page shows from the admin API, such as API keys, is re-read).
"""

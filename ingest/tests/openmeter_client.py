#!/usr/bin/env python3
"""Drives tally's OpenMeter-compatible ingest endpoint with OpenMeter's own Python client.

Usage: openmeter_client.py BASE_URL API_KEY RUN_PREFIX
       e.g. openmeter_client.py http://127.0.0.1:18700 demo-key run42

Run it with the venv made by scripts/pyenv.sh (pins `openmeter` in
scripts/requirements-test.txt):

    PY=$(scripts/pyenv.sh) && "$PY" ingest/tests/openmeter_client.py http://127.0.0.1:18700 demo-key run42

Uses the published client's real calls (openmeter 1.0.0b236, read from its source):
  * openmeter.Client(endpoint=BASE_URL, token=API_KEY)
      -> sends `Authorization: Bearer <token>` (corehttp ServiceKeyCredentialPolicy)
  * client.events.ingest_event(Event)        POST /api/v1/events
      Content-Type: application/cloudevents+json, body: one CloudEvent object
  * client.events.ingest_events([Event, ..]) POST /api/v1/events
      Content-Type: application/cloudevents-batch+json, body: a JSON array
  Both expect 204 and raise corehttp.exceptions.HttpResponseError otherwise
  (ClientAuthenticationError on 401), with the response attached.

Steps: (a) one event through ingest_event, (b) a batch of 5 through ingest_events,
(c) one invalid event (`data.endpoint` is a number; the `requests` meter groups by
`endpoint`, so tally refuses it) which must raise an error showing HTTP 400 and a
problem+json body naming `data.endpoint`.

Prints one JSON line {"sent": [ids...], "invalid_refused": true} and exits 0;
any unexpected exception prints a traceback and exits 1.
"""

import datetime
import json
import sys
import traceback

from corehttp.exceptions import HttpResponseError
from openmeter import Client
from openmeter.models import Event


def make_event(event_id: str, subject: str, endpoint) -> Event:
    return Event(
        id=event_id,
        source="openmeter-python",
        specversion="1.0",
        type="request",
        subject=subject,
        time=datetime.datetime.now(datetime.timezone.utc),
        data={"endpoint": endpoint},
    )


def check_refusal(err: HttpResponseError, bad_id: str) -> None:
    """Asserts the client's error shows a 400 problem+json naming data.endpoint."""
    text = str(err)  # corehttp appends "Content: <response body>"
    status = err.status_code
    response = err.response
    content_type = response.headers.get("Content-Type", "") if response is not None else ""
    body_text = response.text() if response is not None else ""
    detail = f"status={status} content-type={content_type!r} error={text!r}"
    if status != 400:
        raise AssertionError(f"invalid event: expected HTTP 400, got {detail}")
    if not content_type.split(";")[0].strip().lower() == "application/problem+json":
        raise AssertionError(f"invalid event: expected application/problem+json, got {detail}")
    if "data.endpoint" not in text:
        raise AssertionError(f"invalid event: error content does not mention data.endpoint: {detail}")
    problem = json.loads(body_text)
    if problem.get("status") != 400:
        raise AssertionError(f"invalid event: problem status is not 400: {problem}")
    errors = problem.get("errors")
    if not isinstance(errors, list) or not any(
        isinstance(e, dict) and e.get("id") == bad_id and "data.endpoint" in json.dumps(e)
        for e in errors
    ):
        raise AssertionError(
            f"invalid event: problem's errors array does not name {bad_id} / data.endpoint: {problem}"
        )
    # The client also parses the body into its problem model.
    model = getattr(err, "model", None)
    if model is not None and getattr(model, "status", 400) not in (None, 400):
        raise AssertionError(f"invalid event: client's problem model disagrees: {model!r}")


def main(argv) -> int:
    if len(argv) != 4:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    base_url, api_key, prefix = argv[1], argv[2], argv[3]
    subject = f"{prefix}-cust"
    ids = [f"{prefix}-{i}" for i in range(1, 7)]
    sent = []

    try:
        with Client(endpoint=base_url, token=api_key) as client:
            # (a) single event: application/cloudevents+json
            client.events.ingest_event(make_event(ids[0], subject, "/v1/x"))
            sent.append(ids[0])

            # (b) batch of 5: application/cloudevents-batch+json
            batch = [make_event(i, subject, "/v1/x") for i in ids[1:]]
            client.events.ingest_events(batch)
            sent.extend(ids[1:])

            # (c) invalid: non-string dimension, must be refused with 400 problem+json
            bad_id = f"{prefix}-bad"
            try:
                client.events.ingest_event(make_event(bad_id, subject, 5))
            except HttpResponseError as err:
                check_refusal(err, bad_id)
            else:
                raise AssertionError(f"invalid event {bad_id} (data.endpoint = 5) was accepted")
    except Exception:  # noqa: BLE001 - any unexpected failure is a test failure
        traceback.print_exc()
        return 1

    print(json.dumps({"sent": sent, "invalid_refused": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

#!/usr/bin/python3
"""An assistant bot: reads questions from a stream and answers each one in
the asking user's inbox stream, exactly once, across reconnects and restarts.

    inbox_bot.py ws://127.0.0.1:8000/ws [--state bot.json] [--questions assistant.questions]

A question is a message whose payload is UTF-8 text and whose headers name
the user ("user": "17"); the answer goes to "user.<user>.inbox" with the
question's stream and offset as its msgid, so an answer re-sent after a crash
between the publish and the ack is stored once (the server deduplicates by
msgid per producer; give the bot a token so it stays the same producer across
any restart). The session is kept in --state, so a restarted bot resumes its
subscription after the last question it acked.
"""
import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from arq_client import Client, FileSession  # noqa: E402


def answer(question: str) -> str:
    return f"you asked: {question}"


async def run(url: str, state: str, questions: str, token: str | None) -> None:
    async with Client(url, token=token, session=FileSession(state)) as client:
        client.on("state", lambda old, new, err: print(f"bot: {old} -> {new}", err or "", flush=True))
        sub = client.subscribe(questions, "earliest")
        async for m in sub:  # each question once, in order; acked when we ask for the next
            user = (m.headers or {}).get("user")
            if user is None:
                continue  # not a question for us
            await client.publish(f"user.{user}.inbox", answer(m.text()), msgid=f"answer-{m.stream}-{m.offset}")
            print(f"bot: answered {m.stream}@{m.offset} for user {user}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--state", default="inbox_bot.session.json")
    ap.add_argument("--questions", default="assistant.questions")
    ap.add_argument("--token", default=os.environ.get("ARQ_TOKEN"))
    a = ap.parse_args()
    asyncio.run(run(a.url, a.state, a.questions, a.token))


if __name__ == "__main__":
    main()

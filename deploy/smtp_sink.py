"""A loopback SMTP server for the deployment check: appends each mail's Subject to a file.

    python deploy/smtp_sink.py PORT SUBJECTS_FILE [SECONDS]

It stops by itself after SECONDS (default 600), so a forgotten sink does not linger.
"""

import email
import email.policy
import sys
import time

from aiosmtpd.controller import Controller


class SubjectRecorder:
    def __init__(self, path):
        self.path = path

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with open(self.path, 'a', encoding='utf-8') as subjects:
            subjects.write(f'{message["Subject"]}\n')
        return '250 OK'


def main(port, path, seconds='600'):
    controller = Controller(SubjectRecorder(path), hostname='127.0.0.1', port=int(port))
    controller.start()
    try:
        time.sleep(float(seconds))
    finally:
        controller.stop()


if __name__ == '__main__':
    main(*sys.argv[1:])

"""The service's log lines: readable text (the default) or one JSON object per line
(LOG_FORMAT=json), for gunicorn's error and access logs and the app's own loggers alike.

Whatever the format, one record is one line a client cannot break or forge (control
characters are escaped), and a traceback keeps its frames and exception types but never
an exception's message: messages quote data, such as the address an SMTP server refused.
"""

import contextvars
import datetime
import json
import logging
import sys
import time
import traceback

from gunicorn import glogging

# The request being served on this thread, for the lines its handling writes.
request_id = contextvars.ContextVar('request_id', default=None)
# Where the app leaves the matched route template for the access log, in the WSGI environ.
ROUTE_KEY = 'personapi.route'
UNMATCHED_ROUTE = 'unmatched'  # the route of a path no resource serves

APP_FORMAT = '[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s'
# C0 and C1 controls, DEL, and the line and paragraph separators: each could end a line.
_CONTROLS = [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029]
_ESCAPE_CONTROLS = {code: f'\\x{code:02x}' if code < 0x100 else f'\\u{code:04x}'
                    for code in _CONTROLS}
# Inside a quoted field the quote and the escape character are escaped too.
_ESCAPE_QUOTED = {**_ESCAPE_CONTROLS, ord('"'): '\\"', ord('\\'): '\\\\'}


def escape_controls(text):
    # isprintable() is false for every control and separator: the usual line is not copied.
    return text if text.isprintable() else text.translate(_ESCAPE_CONTROLS)


def quoted(text):
    """`text` made safe to print between double quotes."""
    if text.isprintable() and '"' not in text and '\\' not in text:
        return text
    return text.translate(_ESCAPE_QUOTED)


def traceback_without_messages(exc_info):
    """Python's traceback of an exception and of those it chains, each exception's type
    given and its message left out."""
    blocks, error, seen = [], exc_info[1], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        kind = type(error)
        name = kind.__qualname__ if kind.__module__ in ('builtins', '__main__') \
            else f'{kind.__module__}.{kind.__qualname__}'
        frames = ''.join(traceback.format_tb(error.__traceback__))
        blocks.append(f'Traceback (most recent call last):\n{frames}{name} (message withheld)')
        if error.__cause__ is not None:
            blocks.append('\nThe above exception was the direct cause of the following '
                          'exception:\n')
            error = error.__cause__
        elif error.__context__ is not None and not error.__suppress_context__:
            blocks.append('\nDuring handling of the above exception, another exception '
                          'occurred:\n')
            error = error.__context__
        else:
            error = None
    if blocks and not blocks[-1].startswith('Traceback'):
        blocks.pop()  # a chain that loops back ends with a link to nothing
    return '\n'.join(reversed(blocks))


_encode_json = json.JSONEncoder().encode  # ASCII only: every control and separator is escaped
# The handlers gunicorn sets up for a log file or a stream; another (syslog, or one from a
# logging configuration) is given a LogRecord.
_PLAIN_HANDLERS = (logging.StreamHandler, logging.FileHandler)


def _utc_text(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(
        timespec='milliseconds')


class TextFormatter(logging.Formatter):
    """logging's usual text, with controls escaped and exception messages withheld."""

    def format(self, record):
        record.exc_text = None  # never the text another formatter cached: it holds messages
        return super().format(record)

    def formatMessage(self, record):
        return escape_controls(super().formatMessage(record))

    def formatException(self, exc_info):
        return traceback_without_messages(exc_info)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, the record's
    `fields` (an access line's), and `exception` when there is one."""

    def format(self, record):
        line = {'time': _utc_text(record.created),
                'level': record.levelname, 'logger': record.name,
                'message': record.getMessage(), 'request_id': request_id.get(),
                **getattr(record, 'fields', {})}
        if record.exc_info:
            line['exception'] = traceback_without_messages(record.exc_info)
        if record.stack_info:
            line['stack'] = self.formatStack(record.stack_info)
        return _encode_json(line)


def formatter(log_format, text_format=APP_FORMAT, datefmt=None):
    """The formatter LOG_FORMAT names ('text' or 'json'); text lines use `text_format`."""
    return JsonFormatter() if log_format == 'json' else TextFormatter(text_format, datefmt)


def configure(log_format):
    """Send the app's own loggers to stderr in `log_format`; gunicorn's are GunicornLogger's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]  # a configuration reload replaces, never adds
    root.setLevel(logging.INFO)
    GunicornLogger.log_format = log_format


class GunicornLogger(glogging.Logger):
    """gunicorn's logger in the service's format; an access line is built here, from what
    every request has: no access_log_format, so no client text is ever printed raw."""

    log_format = 'text'
    _access_streams = None  # the access log's handlers, when access() may write to them

    def setup(self, cfg):
        super().setup(cfg)
        for log, text_format, datefmt in ((self.error_log, self.error_fmt, self.datefmt),
                                          (self.access_log, self.access_fmt, None)):
            for handler in log.handlers:
                handler.setFormatter(formatter(self.log_format, text_format, datefmt))
        handlers = self.access_log.handlers
        self._access_streams = handlers if all(
            type(handler) in _PLAIN_HANDLERS and not handler.filters for handler in handlers
        ) else None

    def info(self, msg, *args, **kwargs):
        # With SO_REUSEPORT the master has no socket of its own (each worker opens one), and
        # gunicorn would print "Listening at:  (pid)": gunicorn.conf.py says where instead.
        if msg.startswith('Listening at:') and args and not args[0]:
            return
        super().info(msg, *args, **kwargs)

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        method, client = environ.get('REQUEST_METHOD', '-'), environ.get('REMOTE_ADDR', '-')
        path, status = _wsgi_text(environ.get('PATH_INFO', '-')), _status_code(resp)
        rid = _response_header(resp, 'x-request-id')
        duration_ms = round(request_time.total_seconds() * 1000, 1)
        message = (f'{client} "{quoted(method)} {quoted(path)}" {status} '
                   f'{round(duration_ms)}ms rid={quoted(rid or "-")}')
        if self.log_format == 'json':
            fields = {'method': method, 'route': environ.get(ROUTE_KEY, UNMATCHED_ROUTE),
                      'path': path, 'status': status, 'duration_ms': duration_ms,
                      'client': client, 'request_id': rid}
        if self._access_streams is None:  # handlers of a logging configuration: a LogRecord
            self.access_log.info('%s', message,
                                 extra={'fields': fields} if self.log_format == 'json' else {})
            return
        # The line the formatters would make, without a LogRecord (logging's machinery
        # cost about a sixth of a GET's instructions in a whole worker): one write a line.
        if self.log_format == 'json':
            line = _encode_json({'time': _utc_text(time.time()), 'level': 'INFO',
                                 'logger': self.access_log.name, 'message': message,
                                 'request_id': rid, **fields})
        else:
            line = escape_controls(message)
        for handler in self._access_streams:
            with handler.lock:
                handler.stream.write(line + '\n')
                handler.stream.flush()


def _status_code(resp):
    # resp.status, not status_code: gunicorn sets only the former on the answers it makes
    # itself (a request it refuses before the app)
    code = str(resp.status or '').split(' ', 1)[0]
    return int(code) if code.isdigit() else None


def _wsgi_text(text):
    """A WSGI string (bytes as latin-1) as the UTF-8 text the client meant."""
    return text.encode('latin-1').decode('utf-8', 'replace')


def _response_header(resp, name):
    for key, value in resp.headers:
        if len(key) == len(name) and key.lower() == name:
            return value
    return None

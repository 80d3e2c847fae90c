/**
 * Errors of the client. Local failures have a `code` naming what went wrong;
 * a server `nack` or `error` has code "server" and the protocol's numeric code
 * in `status` (docs/protocol.md section 7).
 */
export type ErrorCode =
  | "invalid" // bad argument (stream name, offset, options)
  | "not-connected" // not connected and not allowed to queue (idle, or a final state)
  | "too-big" // payload over the server's max_payload
  | "full" // maxPending publishes are already waiting for a puback
  | "busy" // already connecting, or already subscribed to that stream
  | "connection-lost" // the connection ended and reconnection is off, or gave up
  | "closed" // closed by close() or an AbortSignal
  | "session-taken" // the session was resumed by another connection (close 4001)
  | "timeout" // no welcome within connectTimeoutMs
  | "protocol" // the server broke the protocol
  | "server"; // a nack or error from the server: see `status`

export class ArqError extends Error {
  readonly code: ErrorCode;
  /** The server's code (400, 401, 403, 409, 413, 503...) when code is "server". */
  readonly status: number | undefined;

  constructor(code: ErrorCode, message: string, status?: number) {
    super(message);
    this.name = "ArqError";
    this.code = code;
    this.status = status;
  }
}

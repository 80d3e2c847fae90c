/**
 * The WebSocket the client talks through: the browser's (or Node 22's)
 * global WebSocket, else the `ws` package on Node. Both follow the WHATWG
 * API used here (binaryType "arraybuffer", on* handlers, close codes).
 */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  readonly protocol: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  /** ws only: drop the TCP connection without a close handshake. */
  terminate?(): void;
}

export type WebSocketConstructor = new (url: string, protocols: string | string[]) => WebSocketLike;

export const OPEN = 1;

let nodeWs: Promise<WebSocketConstructor> | null = null;

export function resolveWebSocket(given?: WebSocketConstructor): Promise<WebSocketConstructor> {
  if (given) return Promise.resolve(given);
  const g = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (g) return Promise.resolve(g);
  // Node 20 has no global WebSocket. Imported only here, so that a browser
  // build never loads it.
  nodeWs ??= import("ws").then((m) => m.default as unknown as WebSocketConstructor);
  return nodeWs;
}

/**
 * arq-client: the ARQ broker's client for browsers and Node (arq.v1,
 * docs/protocol.md; semantics of libarq, client/arq.h; guide: docs/clients.md).
 */
export { ArqClient, VERSION } from "./client.js";
export type { ClientEvents, ClientOptions, ClientStats, PubAck, PublishOptions, State, TokenProvider } from "./client.js";
export { ArqError } from "./errors.js";
export type { ErrorCode } from "./errors.js";
export { localStorageSession, memorySession } from "./session-store.js";
export type { SavedSession, SessionStore } from "./session-store.js";
export { Subscription } from "./subscription.js";
export type { Message, SubscribeOptions, SubscriptionInfo } from "./subscription.js";
export { backoffDelay } from "./backoff.js";
export type { WebSocketConstructor, WebSocketLike } from "./transport.js";

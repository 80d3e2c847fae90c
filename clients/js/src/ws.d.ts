// The part of the `ws` package's types this client needs (transport.ts
// loads it only on Node, where there is no global WebSocket).
declare module "ws" {
  const WebSocket: unknown;
  export default WebSocket;
}

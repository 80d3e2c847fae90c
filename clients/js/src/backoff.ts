/**
 * Delay before reconnection attempt `n` (0-based): uniform random in
 * [0, min(cap, base * 2^n)] ("full jitter"), as libarq does, so that a fleet
 * of clients cut at the same moment does not come back at the same moment.
 */
export function backoffDelay(n: number, baseMs: number, capMs: number, random: () => number = Math.random): number {
  // 2^n overflows to Infinity for large n, and min() then takes the cap.
  const ceiling = Math.min(capMs, baseMs * 2 ** n);
  return Math.floor(random() * (ceiling + 1));
}

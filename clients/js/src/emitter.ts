/** A minimal typed event emitter (no dependency on Node's events or the DOM's EventTarget). */
export class Emitter<Events extends object> {
  private readonly listeners = new Map<keyof Events, Set<(ev: never) => void>>();

  /** Add a listener; returns a function that removes it. */
  on<K extends keyof Events>(name: K, fn: (ev: Events[K]) => void): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(fn as (ev: never) => void);
    return () => this.off(name, fn);
  }

  off<K extends keyof Events>(name: K, fn: (ev: Events[K]) => void): void {
    this.listeners.get(name)?.delete(fn as (ev: never) => void);
  }

  protected emit<K extends keyof Events>(name: K, ev: Events[K]): void {
    for (const fn of [...(this.listeners.get(name) ?? [])]) {
      try {
        (fn as (ev: Events[K]) => void)(ev);
      } catch (e) {
        reportLater(e);
      }
    }
  }
}

/**
 * An exception thrown by application code called from the client (a
 * listener, an onMessage callback) must not corrupt the client's state: it is
 * rethrown from a fresh task, where it surfaces as an uncaught exception, as
 * one thrown by a DOM event listener does.
 */
export function reportLater(e: unknown): void {
  setTimeout(() => {
    throw e;
  }, 0);
}

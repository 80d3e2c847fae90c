/**
 * Where the client keeps the session id and resume token of the last
 * `welcome`, so that a reconnect (or, with a persistent store, a page reload
 * or a process restart) resumes the session: its subscriptions continue
 * after their acked offsets, and an anonymous client stays the same producer
 * for msgid deduplication (docs/protocol.md section 4a).
 *
 * The resume token is a secret: store it where the application keeps its
 * other credentials.
 */
export interface SavedSession {
  session: string;
  resumeToken: string;
}

export interface SessionStore {
  /** Called once, before the first connection attempt. */
  load(): SavedSession | null | Promise<SavedSession | null>;
  /** Called after every welcome with the session it names. */
  save(session: SavedSession): void | Promise<void>;
}

/** Kept in this client only: resumes across reconnects, not across restarts. */
export function memorySession(): SessionStore {
  let saved: SavedSession | null = null;
  return {
    load: () => saved,
    save: (s) => {
      saved = s;
    },
  };
}

/** Kept in window.localStorage under `key`: survives a page reload. */
export function localStorageSession(key = "arq.session", storage: Storage = globalThis.localStorage): SessionStore {
  return {
    load() {
      const raw = storage.getItem(key);
      if (raw === null) return null;
      try {
        const v = JSON.parse(raw) as Partial<SavedSession>;
        return typeof v.session === "string" && typeof v.resumeToken === "string"
          ? { session: v.session, resumeToken: v.resumeToken }
          : null;
      } catch {
        return null; // written by something else: start a new session
      }
    },
    save(s) {
      storage.setItem(key, JSON.stringify(s));
    },
  };
}

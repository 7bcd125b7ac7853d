/** The one error type of the SDK: a stable code and a sentence, as the node answers. */
export class CustosError extends Error {
  constructor(
    readonly code: string,
    readonly detail: string,
    readonly status?: number,
  ) {
    super(`${code}: ${detail}`);
    this.name = "CustosError";
  }
}

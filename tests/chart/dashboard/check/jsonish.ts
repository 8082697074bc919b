// JSON cannot spell a TypeScript string enum member: "absolute" is not ThresholdsMode.Absolute.
// Jsonish<T> replaces every string enum (and string literal type) by its string values and
// keeps the rest, so a dashboard JSON literal can be checked with `satisfies`.
export type Jsonish<T> =
  T extends string ? `${T}` :
  T extends number | boolean | null | undefined ? T :
  T extends ReadonlyArray<infer U> ? Array<Jsonish<U>> :
  T extends object ? { [K in keyof T]: Jsonish<T[K]> } :
  T;

// Generates canon-js.json: inputs and the canonical text the JavaScript implementation produces
// for them (the canonicalJson of @optimystic/db-core: JSON.stringify after sorting keys).
// Run: node gen-canon-js.mjs > canon-js.json  (deterministic: seeded PRNG)
function canonicalJson(value) {
  return JSON.stringify(value, (_, v) =>
    v && typeof v === 'object' && !Array.isArray(v)
      ? Object.keys(v).sort().reduce((o, k) => { o[k] = v[k]; return o; }, {})
      : v);
}
let seed = 0x2545f491;
function rnd() { // xorshift32
  seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0;
  return seed / 4294967296;
}
function rndInt(n) { return Math.floor(rnd() * n); }
const view = new DataView(new ArrayBuffer(8));
function rndDouble() {
  switch (rndInt(5)) {
    case 0: { // random bit pattern
      view.setUint32(0, rndInt(4294967296)); view.setUint32(4, rndInt(4294967296));
      const d = view.getFloat64(0);
      return Number.isFinite(d) ? d : 1.5;
    }
    case 1: return (rnd() - 0.5) * 10 ** (rndInt(40) - 20);
    case 2: return Math.round((rnd() - 0.5) * 10 ** rndInt(22));
    case 3: return Number((rnd() * 1000).toFixed(rndInt(6)));
    default: return rndInt(2 ** 31) * 2 ** rndInt(60);
  }
}
const alphabet = ['a', 'b', 'Z', '0', '1', '9', '-', '_', ' ', '"', '\\', '\n', '\t', '\u0000',
  '\u001f', '\u007f', 'é', '\u2028', '\u2029', '\uff61', '\ue000', '\ud83d\ude00', '\ud800\udc00', '中'];
function rndString() {
  if (rnd() < 0.3) return String(rnd() < 0.5 ? rndInt(20) : rndInt(2 ** 32 + 5));
  if (rnd() < 0.1) return '0' + rndInt(10);
  let s = ''; const n = rndInt(6);
  for (let i = 0; i < n; i++) s += alphabet[rndInt(alphabet.length)];
  return s;
}
function rndValue(depth) {
  const r = rnd();
  if (depth > 3 || r < 0.3) {
    const t = rndInt(5);
    return t === 0 ? null : t === 1 ? rnd() < 0.5 : t === 2 ? rndDouble() : rndString();
  }
  if (r < 0.55) { const a = []; const n = rndInt(4); for (let i = 0; i < n; i++) a.push(rndValue(depth + 1)); return a; }
  const o = {}; const n = rndInt(6);
  for (let i = 0; i < n; i++) o[rndString()] = rndValue(depth + 1);
  return o;
}
const numbers = [];
for (let i = 0; i < 3000; i++) numbers.push(rndDouble());
numbers.push(0, -0, 1e21, 1e-7, 1.5e-7, 123456789012345680000, 2 ** 53, 2 ** 53 + 2, 2 ** 64,
  Number.MAX_VALUE, Number.MIN_VALUE, -Number.MAX_SAFE_INTEGER, 0.1, 0.30000000000000004, 1795608533215);
const cases = [];
for (const n of numbers) { const t = JSON.stringify(n); cases.push([t, canonicalJson(JSON.parse(t))]); }
for (let i = 0; i < 500; i++) {
  const v = rndValue(0);
  cases.push([JSON.stringify(v), canonicalJson(v)]);
}
process.stdout.write(JSON.stringify(cases, null, 0) + '\n');

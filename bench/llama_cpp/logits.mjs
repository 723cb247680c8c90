// llama.cpp's logits (node-llama-cpp's prebuilt CPU build, never built here) at every position of a
// sequence of token ids: node logits.mjs MODEL.gguf '[ids]' prints {"logits": [[...vocab] per position]}.
import {getLlama} from "node-llama-cpp";

const [modelPath, tokensJson] = process.argv.slice(2);
const tokens = JSON.parse(tokensJson);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: tokens.length + 1, batchSize: tokens.length, threads: 2});
const out = await context.getSequence().controlledEvaluate(tokens.map((t) => [t, {generateNext: {logits: true}}]));
const logits = out.map((o) => Array.from({length: o.next.logits.size}, (_, k) => o.next.logits.get(k)));
console.log(JSON.stringify({logits}));
await context.dispose();
await model.dispose();
await llama.dispose();

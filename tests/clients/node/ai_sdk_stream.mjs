// One streamText call through the Vercel AI SDK, as an application makes it, and what the
// application sees: the text it was given, every error with the SDK's own reading of it
// (status code, retryable or not), and how the call ended. Printed as one JSON line.
//
//   node ai_sdk_stream.mjs --api chat|responses|anthropic --base-url URL
//        [--header name=value]... [--max-retries N] [--prompt TEXT]
import { streamText } from "ai";
import { createOpenAI } from "@ai-sdk/openai";
import { createAnthropic } from "@ai-sdk/anthropic";

function parseArgs(argv) {
  const args = { headers: {}, maxRetries: 2, prompt: "What is the project called?" };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === "--api") args.api = value;
    else if (flag === "--base-url") args.baseURL = value;
    else if (flag === "--max-retries") args.maxRetries = Number(value);
    else if (flag === "--prompt") args.prompt = value;
    else if (flag === "--header") {
      const at = value.indexOf("=");
      args.headers[value.slice(0, at)] = value.slice(at + 1);
    } else throw new Error(`unknown flag ${flag}`);
  }
  return args;
}

function model(args) {
  const common = { baseURL: args.baseURL, apiKey: "sk-test", headers: args.headers };
  if (args.api === "chat") return createOpenAI(common).chat("gpt-4o-mini");
  if (args.api === "responses") return createOpenAI(common).responses("gpt-5-mini");
  if (args.api === "anthropic") return createAnthropic(common)("claude-sonnet-4-6");
  throw new Error(`unknown api ${args.api}`);
}

// The fields an application reads to decide what to do with an error.
function describe(error) {
  const seen = error?.lastError ?? error;
  return {
    name: error?.name ?? null,
    reason: error?.reason ?? null,
    statusCode: seen?.statusCode ?? null,
    isRetryable: seen?.isRetryable ?? null,
    message: seen?.message ?? null,
    type: seen?.type ?? null,
    code: seen?.code ?? null,
  };
}

const args = parseArgs(process.argv.slice(2));
const out = { text: "", errors: [], finishReason: null };
const result = streamText({
  model: model(args),
  prompt: args.prompt,
  maxRetries: args.maxRetries,
  onError: () => {}, // reported through fullStream below; this only silences the default log
});
for await (const part of result.fullStream) {
  if (part.type === "text-delta") out.text += part.text;
  else if (part.type === "error") out.errors.push(describe(part.error));
  else if (part.type === "finish") out.finishReason = part.finishReason;
}
console.log(JSON.stringify(out));

-- securellm.nvim: the SecureLLM gateway from Neovim (0.7 and later), in Lua with no other
-- plugin: chat with streamed answers, ask about / rewrite a selection, inline completion, the
-- stack's status and the model list. Every request is `curl` in a job (`securellm.http`).
--
--   require('securellm').setup({ url = 'http://127.0.0.1:8088', model = 'tiny' })
--
-- Commands (plugin/securellm.lua): :SecureLLMChat, :SecureLLMSend, :SecureLLMCancel,
-- :'<,'>SecureLLMAsk {question}, :'<,'>SecureLLMRewrite {instruction}, :SecureLLMComplete,
-- :SecureLLMAccept, :SecureLLMDismiss, :SecureLLMStatus, :SecureLLMModels; `:checkhealth
-- securellm`.

local M = {}

function M.setup(opts)
  return require('securellm.config').setup(opts)
end

function M.chat()
  return require('securellm.chat').open()
end

function M.send(opts)
  return require('securellm.chat').send(opts)
end

function M.cancel()
  return require('securellm.chat').cancel()
end

function M.ask(first, last, question, opts)
  return require('securellm.edit').ask(first, last, question, opts)
end

function M.rewrite(first, last, instruction, opts)
  return require('securellm.edit').rewrite(first, last, instruction, opts)
end

function M.complete(opts)
  return require('securellm.edit').complete(opts)
end

function M.accept()
  return require('securellm.edit').accept()
end

function M.dismiss()
  return require('securellm.edit').dismiss()
end

function M.status(opts)
  return require('securellm.status').show(opts)
end

function M.models(opts)
  return require('securellm.status').models(opts)
end

return M

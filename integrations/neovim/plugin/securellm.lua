-- The user commands of securellm.nvim (the settings stay at their defaults until `setup()`).
if vim.g.loaded_securellm then
  return
end
vim.g.loaded_securellm = true

local function cmd(name, fn, opts)
  vim.api.nvim_create_user_command(name, fn, opts or {})
end

local s = function()
  return require('securellm')
end

cmd('SecureLLMChat', function()
  s().chat()
end, { desc = 'Open the SecureLLM chat buffer' })
cmd('SecureLLMSend', function()
  s().send()
end, { desc = 'Send the chat buffer' })
cmd('SecureLLMCancel', function()
  s().cancel()
end, { desc = 'Cancel the request in flight' })
cmd('SecureLLMAsk', function(a)
  s().ask(a.line1, a.line2, a.args)
end, { range = true, nargs = '*', desc = 'Ask about the selected lines in the chat' })
cmd('SecureLLMRewrite', function(a)
  s().rewrite(a.line1, a.line2, a.args)
end, { range = true, nargs = '*', desc = 'Rewrite the selected lines' })
cmd('SecureLLMComplete', function()
  s().complete()
end, { desc = 'Inline completion at the cursor' })
cmd('SecureLLMAccept', function()
  s().accept()
end, { desc = 'Insert the completion shown' })
cmd('SecureLLMDismiss', function()
  s().dismiss()
end, { desc = 'Drop the completion shown' })
cmd('SecureLLMStatus', function()
  s().status()
end, { desc = 'GPUs, leases, loaded models (admin token)' })
cmd('SecureLLMModels', function()
  s().models()
end, { desc = 'Pick the model' })

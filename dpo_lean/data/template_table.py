"""LLaMA-Factory 0.9.5's chat templates as data: one entry per name, LF's slots and flags.

Read from LF v0.9.5 ``src/llamafactory/data/template.py``; fields left out take LF's defaults (see
:func:`template_model.make_template`). ``processor`` marks the templates LF ties to an image/audio plugin:
dpo-lean uses their text form. ``tools/lf_parity.py`` checks every entry against LF's own pipeline.
"""

from __future__ import annotations

from .template_model import BOS, EOS, Template, Token, make_template

IM_USER = ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)
IM_TOOL = ("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)
QWEN_TOOL = ("<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

_CHATML = dict(user=IM_USER, assistant=("{{content}}<|im_end|>\n",), system=("<|im_start|>system\n{{content}}<|im_end|>\n",))
_GLM = dict(user=("<|user|>\n{{content}}<|assistant|>",), assistant=("\n{{content}}",), system=("<|system|>\n{{content}}",),
            observation=("<|observation|>\n{{content}}<|assistant|>",), prefix=("[gMASK]<sop>",), efficient_eos=True)
_GEMMA = dict(user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
              assistant=("{{content}}<end_of_turn>\n",), system=("{{content}}\n\n",),
              observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",), prefix=(BOS,), kind="llama2")
_LLAMA3 = dict(
    user=("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",),
    assistant=("{{content}}<|eot_id|>",), system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
    observation=("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",),
    prefix=(BOS,), stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True)
_VICUNA = dict(user=("USER: {{content}} ASSISTANT:",), default_system=VICUNA_SYSTEM)

_TABLE: dict[str, dict] = {
    "alpaca": dict(user=("### Instruction:\n{{content}}\n\n### Response:\n",), assistant=("{{content}}", EOS, "\n\n"),
        default_system=("Below is an instruction that describes a task. Write a response that appropriately completes the "
                        "request.\n\n")),
    "bailing": dict(user=("<role>HUMAN</role>{{content}}<role>ASSISTANT</role>",), system=("<role>SYSTEM</role>{{content}}",),
        observation=("<role>OBSERVATION</role>{{content}}<role>ASSISTANT</role>",), stop_words=("<|endoftext|>",),
        efficient_eos=True),
    "bailing_v2": dict(user=("<role>HUMAN</role>{{content}}<|role_end|><role>ASSISTANT</role>",),
        assistant=("{{content}}<|role_end|>",), system=("<role>SYSTEM</role>{{content}}<|role_end|>",),
        observation=(("<role>OBSERVATION</role>\n<tool_response>\n{{content}}\n"
                      "</tool_response><|role_end|><role>ASSISTANT</role>"),),
        stop_words=("<|endoftext|>",), efficient_eos=True),
    "breeze": dict(user=("[INST] {{content}} [/INST] ",), prefix=(BOS,), efficient_eos=True),
    "chatglm3": dict(user=(Token("<|user|>"), "\n", "{{content}}", Token("<|assistant|>")), assistant=("\n", "{{content}}"),
        system=(Token("<|system|>"), "\n", "{{content}}"),
        observation=(Token("<|observation|>"), "\n", "{{content}}", Token("<|assistant|>")),
        prefix=(Token("[gMASK]"), Token("sop")), stop_words=("<|user|>", "<|observation|>"), efficient_eos=True),
    "chatml": dict(**_CHATML, observation=IM_TOOL, stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True),
    "chatml_de": dict(**_CHATML, observation=IM_TOOL, default_system="Du bist ein freundlicher und hilfsbereiter KI-Assistent.",
        stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True),
    "cohere": dict(
        user=("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",),
        system=("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>",), prefix=(BOS,)),
    "cpm4": dict(**_CHATML, observation=IM_TOOL, prefix=(BOS,), stop_words=("<|im_end|>",)),
    "dbrx": dict(**_CHATML, observation=IM_TOOL,
        default_system=("You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions "
                        "based on information available up to that point.\nYOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS "
                        "OR STATEMENTS, but provide thorough responses to more complex and open-ended questions.\nYou "
                        "assist with various tasks, from writing to coding (using markdown for code blocks — remember to "
                        "use ``` with code, JSON, and tables).\n(You do not have real-time data access or code execution "
                        "capabilities. You avoid stereotyping and provide balanced perspectives on controversial topics. "
                        "You do not provide song lyrics, poems, or news articles and do not divulge details of your "
                        "training data.)\nThis is your system prompt, guiding your responses. Do not reference it, just "
                        "respond to the user. If you find yourself talking about this message, stop. You should be "
                        "responding appropriately and usually that means not mentioning this.\nYOU DO NOT MENTION ANY OF "
                        "THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY."),
        stop_words=("<|im_end|>",), replace_eos=True),
    "deepseek": dict(user=("User: {{content}}\n\nAssistant:",), system=("{{content}}\n\n",), prefix=(BOS,)),
    "deepseek3": dict(user=("<｜User｜>{{content}}<｜Assistant｜>",), prefix=(BOS,)),
    "deepseekr1": dict(user=("<｜User｜>{{content}}<｜Assistant｜>",), prefix=(BOS,), kind="reasoning"),
    "hy3": dict(user=("<｜hy_User｜>{{content}}<｜hy_Assistant｜>",), assistant=("{{content}}<｜hy_eos｜>",), prefix=(BOS,),
        stop_words=("<｜hy_eos｜>",), thought_words=("<think>", "</think>"), replace_eos=True, kind="reasoning"),
    "deepseekcoder": dict(user=("### Instruction:\n{{content}}\n### Response:",), assistant=("\n{{content}}\n<|EOT|>\n",),
        prefix=(BOS,),
        default_system=("You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeek "
                        "Company, and you only answer questions related to computer science. For politically sensitive "
                        "questions, security and privacy issues, and other non-computer science questions, you will refuse "
                        "to answer.\n")),
    "default": dict(user=("Human: {{content}}", EOS, "\nAssistant:"), assistant=("{{content}}", EOS, "\n"),
        system=("System: {{content}}", EOS, "\n")),
    "dots_ocr": dict(user=("<|user|>{{content}}<|endofuser|><|assistant|>",), assistant=("{{content}}<|endofassistant|>",),
        system=("<|system|>{{content}}<|endofsystem|>\n",), stop_words=("<|endofassistant|>",), efficient_eos=True,
        processor="Qwen2VLPlugin"),
    "empty": dict(assistant=("{{content}}",)),
    "ernie": dict(user=("<|im_start|>user\n{{content}}<|im_end|>\n\n<|im_start|>assistant\n",),
        assistant=("{{content}}<|im_end|>\n\n",), system=("<|im_start|>system\n{{content}}<|im_end|>\n\n",),
        observation=("<|im_start|>tool\n{{content}}<|im_end|>\n\n<|im_start|>assistant\n",),
        default_system="<global_setting>\nthink_mode=True\n</global_setting>", stop_words=("<|im_end|>",)),
    "ernie_nothink": dict(user=("User: {{content}}\nAssistant: ",), assistant=("{{content}}<|end_of_sentence|>",),
        system=("{{content}}\n",), prefix=("<|begin_of_sentence|>",), stop_words=("<|end_of_sentence|>",)),
    "ernie_vl": dict(user=("User: {{content}}",), assistant=("\nAssistant: {{content}}<|end_of_sentence|>",),
        system=("{{content}}\n",), stop_words=("<|end_of_sentence|>",), replace_eos=True, kind="reasoning",
        processor="ErnieVLPlugin"),
    "exaone": dict(user=("[|user|]{{content}}\n[|assistant|]",), assistant=("{{content}}", EOS, "\n"),
        system=("[|system|]{{content}}[|endofturn|]\n",)),
    "falcon": dict(user=("User: {{content}}\nFalcon:",), assistant=("{{content}}\n",), efficient_eos=True),
    "falcon_h1": dict(**_CHATML, observation=IM_TOOL, prefix=(BOS,), stop_words=("<|im_end|>", "<|end_of_text|>")),
    "fewshot": dict(assistant=("{{content}}\n\n",), efficient_eos=True),
    "gemma": dict(**_GEMMA, stop_words=("<end_of_turn>",), replace_eos=True),
    "gemma2": dict(**_GEMMA, stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True),
    "gemma3": dict(**_GEMMA, stop_words=("<end_of_turn>",), replace_eos=True, processor="Gemma3Plugin"),
    "gemma3n": dict(**_GEMMA, stop_words=("<end_of_turn>",), replace_eos=True, processor="Gemma3nPlugin"),
    "gemma4": dict(user=("<|turn>user\n{{content}}<turn|>\n<|turn>model\n",), assistant=("{{content}}<turn|>\n",),
        system=("<|turn>system\n<|think|>{{content}}<turn|>\n",), observation=("<|turn>tool\n{{content}}<turn|>\n<|turn>model\n",),
        prefix=(BOS,), default_system="You are a helpful assistant.", stop_words=("<turn|>",),
        thought_words=("<|channel>thought\n", "<channel|>"), replace_eos=True, kind="reasoning", processor="Gemma4Plugin"),
    "gemma4n": dict(user=("<|turn>user\n{{content}}<turn|>\n<|turn>model\n",), assistant=("{{content}}<turn|>\n",),
        system=("<|turn>system\n<|think|>{{content}}<turn|>\n",), observation=("<|turn>tool\n{{content}}<turn|>\n<|turn>model\n",),
        prefix=(BOS,), default_system="You are a helpful assistant.", stop_words=("<turn|>",),
        thought_words=("<|channel>thought\n", "<channel|>"), replace_eos=True, kind="reasoning", processor="Gemma4Plugin"),
    "glm4": dict(**_GLM, stop_words=("<|user|>", "<|observation|>")),
    "glm4_moe": dict(**_GLM, stop_words=("<|user|>", "<|observation|>"), kind="reasoning"),
    "glm4v": dict(**_GLM, stop_words=("<|user|>", "<|observation|>", "</answer>"), kind="reasoning", processor="GLM4VPlugin"),
    "glm4_5v": dict(**_GLM, stop_words=("<|user|>", "<|observation|>", "</answer>"), kind="reasoning", processor="GLM4VPlugin"),
    "glm_ocr": dict(**_GLM, stop_words=("<|user|>", "<|observation|>"), processor="GLM4VPlugin"),
    "glm4_7": dict(**_GLM, stop_words=("<|user|>", "<|observation|>"), thought_words=("<think>", "</think>"), kind="glm47"),
    "glmz1": dict(**_GLM, stop_words=("<|user|>", "<|observation|>"), kind="reasoning"),
    "gpt_oss": dict(user=("<|start|>user<|message|>{{content}}<|end|><|start|>assistant",),
        system=("<|start|>system<|message|>{{content}}<|end|>",),
        default_system="You are ChatGPT, a large language model trained by OpenAI.",
        thought_words=("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>"),
        efficient_eos=True, kind="reasoning"),
    "granite3": dict(
        user=("<|start_of_role|>user<|end_of_role|>{{content}}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",),
        assistant=("{{content}}<|end_of_text|>\n",),
        system=("<|start_of_role|>system<|end_of_role|>{{content}}<|end_of_text|>\n",)),
    "granite3_vision": dict(user=("<|user|>\n{{content}}\n<|assistant|>\n",), system=("<|system|>\n{{content}}\n",),
        default_system=VICUNA_SYSTEM, processor="LlavaNextPlugin"),
    "granite4": dict(
        user=("<|start_of_role|>user<|end_of_role|>{{content}}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",),
        assistant=("{{content}}<|end_of_text|>\n",),
        system=("<|start_of_role|>system<|end_of_role|>{{content}}<|end_of_text|>\n",),
        observation=("<|start_of_role|>tool<|end_of_role|>{{content}}<|end_of_text|>\n<|start_of_role|>assistant\n",),
        default_system="You are Granite, developed by IBM. You are a helpful AI assistant.", stop_words=("<|end_of_text|>",)),
    "index": dict(user=("reserved_0{{content}}reserved_1",), system=("<unk>{{content}}",), efficient_eos=True),
    "hunyuan": dict(user=("{{content}}<|extra_0|>",), assistant=("{{content}}<|eos|>",), system=("{{content}}<|extra_4|>",),
        prefix=("<|startoftext|>",), stop_words=("<|eos|>",)),
    "hunyuan_small": dict(user=("<｜hy_User｜>{{content}}<｜hy_place▁holder▁no▁8｜>",),
        assistant=("{{content}}<｜hy_place▁holder▁no▁2｜>",), system=("{{content}}<｜hy_place▁holder▁no▁3｜>",),
        prefix=("<｜hy_begin▁of▁sentence｜>",), stop_words=("<｜hy_place▁holder▁no▁2｜>",)),
    "intern2": dict(**_CHATML, prefix=(BOS,),
        default_system=("You are an AI assistant whose name is InternLM (书生·浦语).\n- InternLM (书生·浦语) is a conversational "
                        "language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be "
                        "helpful, honest, and harmless.\n- InternLM (书生·浦语) can understand and communicate fluently in the "
                        "language chosen by the user such as English and 中文."),
        stop_words=("<|im_end|>",)),
    "intern_vl": dict(**_CHATML, prefix=(BOS,),
        default_system="你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
        stop_words=("<|im_end|>",), processor="InternVLPlugin"),
    "intern_s1": dict(**_CHATML, prefix=(BOS,), stop_words=("<|im_end|>",), processor="InternVLPlugin"),
    "keye_vl": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True, kind="reasoning",
        processor="Qwen2VLPlugin"),
    "kimi_vl": dict(user=("<|im_user|>user<|im_middle|>{{content}}<|im_end|><|im_assistant|>assistant<|im_middle|>",),
        assistant=("{{content}}<|im_end|>",), system=("<|im_system|>system<|im_middle|>{{content}}<|im_end|>",),
        default_system="You are a helpful assistant", stop_words=("<|im_end|>",), thought_words=("◁think▷", "◁/think▷"),
        kind="reasoning", processor="KimiVLPlugin"),
    "lfm2": dict(**_CHATML,
        observation=(("<|im_start|>tool\n<|tool_response_start|>{{content}}<|tool_response_end|><|im_end|>\n"
                      "<|im_start|>assistant\n"),),
        default_system="You are a helpful AI assistant.", stop_words=("<|im_end|>",), replace_eos=True),
    "lfm2_vl": dict(**_CHATML,
        observation=(("<|im_start|>tool\n<|tool_response_start|>{{content}}<|tool_response_end|><|im_end|>\n"
                      "<|im_start|>assistant\n"),),
        default_system="You are a helpful multimodal assistant by Liquid AI.", stop_words=("<|im_end|>",), replace_eos=True,
        processor="LFMVLPlugin"),
    "llama2": dict(user=(BOS, "[INST] {{content}} [/INST]"), system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",), kind="llama2"),
    "llama2_zh": dict(user=(BOS, "[INST] {{content}} [/INST]"), system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
        default_system="You are a helpful assistant. 你是一个乐于助人的助手。", kind="llama2"),
    "llama3": dict(**_LLAMA3),
    "llama4": dict(user=("<|header_start|>user<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n",),
        assistant=("{{content}}<|eot|>",), system=("<|header_start|>system<|header_end|>\n\n{{content}}<|eot|>",),
        observation=("<|header_start|>ipython<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n",),
        prefix=(BOS,), stop_words=("<|eot|>", "<|eom|>"), replace_eos=True, processor="Llama4Plugin"),
    "mllama": dict(**_LLAMA3, processor="MllamaPlugin"),
    "moonlight": dict(user=("<|im_user|>user<|im_middle|>{{content}}<|im_end|><|im_assistant|>assistant<|im_middle|>",),
        assistant=("{{content}}<|im_end|>",), system=("<|im_system|>system<|im_middle|>{{content}}<|im_end|>",),
        default_system="You are a helpful assistant provided by Moonshot-AI.", stop_words=("<|im_end|>",), replace_eos=True),
    "llava": dict(**_VICUNA, processor="LlavaPlugin"),
    "llava_next": dict(**_VICUNA, processor="LlavaNextPlugin"),
    "llava_next_llama3": dict(**_LLAMA3, processor="LlavaNextPlugin"),
    "llava_next_mistral": dict(user=("[INST] {{content}}[/INST]",), assistant=(" {{content}}", EOS), system=("{{content}}\n\n",),
        observation=("[TOOL_RESULTS] {\"content\": {{content}}}[/TOOL_RESULTS]",), prefix=(BOS,), kind="llama2",
        processor="LlavaNextPlugin"),
    "llava_next_qwen": dict(**_CHATML, observation=QWEN_TOOL, default_system="You are a helpful assistant.",
        stop_words=("<|im_end|>",), replace_eos=True, processor="LlavaNextPlugin"),
    "llava_next_yi": dict(**_CHATML, stop_words=("<|im_end|>",), processor="LlavaNextPlugin"),
    "llava_next_video": dict(**_VICUNA, processor="LlavaNextVideoPlugin"),
    "llava_next_video_mistral": dict(user=("[INST] {{content}}[/INST]",), assistant=(" {{content}}", EOS),
        system=("{{content}}\n\n",), observation=("[TOOL_RESULTS] {\"content\": {{content}}}[/TOOL_RESULTS]",), prefix=(BOS,),
        kind="llama2", processor="LlavaNextVideoPlugin"),
    "llava_next_video_yi": dict(**_CHATML, stop_words=("<|im_end|>",), processor="LlavaNextVideoPlugin"),
    "mimo": dict(**_CHATML, observation=QWEN_TOOL, default_system="You are a helpful assistant.", stop_words=("<|im_end|>",),
        replace_eos=True, kind="reasoning"),
    "mimo_v2": dict(**_CHATML, observation=QWEN_TOOL, default_system="You are MiMo, a helpful AI assistant engineered by Xiaomi.",
        stop_words=("<|im_end|>",), thought_words=("<think>", "</think>"), replace_eos=True, kind="reasoning"),
    "mimo_vl": dict(**_CHATML, observation=QWEN_TOOL, default_system="You are MiMo, an AI assistant developed by Xiaomi.",
        stop_words=("<|im_end|>",), replace_eos=True, kind="reasoning", processor="Qwen2VLPlugin"),
    "minicpm_v": dict(**_CHATML, default_system="You are a helpful assistant.", stop_words=("<|im_end|>",),
        processor="MiniCPMVPlugin"),
    "minicpm_v_4_6": dict(**_CHATML, default_system="You are a helpful assistant.", stop_words=("<|im_end|>",),
        processor="MiniCPMV4_6Plugin"),
    "minicpm_o": dict(**_CHATML,
        default_system="You are a helpful assistant. You can accept audio and text input and output voice and text.",
        stop_words=("<|im_end|>",), processor="MiniCPMVPlugin"),
    "minimax1": dict(
        user=("<beginning_of_sentence>user name=user\n{{content}}<end_of_sentence>\n<beginning_of_sentence>ai name=assistant\n",),
        assistant=("{{content}}<end_of_sentence>\n",),
        system=("<beginning_of_sentence>system ai_setting=assistant\n{{content}}<end_of_sentence>\n",),
        observation=(("<beginning_of_sentence>tool name=tools\n{{content}}<end_of_sentence>\n<beginning_of_sentence>ai "
                      "name=assistant\n"),),
        default_system="You are a helpful assistant.", stop_words=("<end_of_sentence>",)),
    "minimax2": dict(user=("]~b]user\n{{content}}[e~[\n]~b]ai\n",), assistant=("{{content}}[e~[\n",),
        system=("]~!b[]~b]system\n{{content}}[e~[\n",), observation=("]~b]tool\n<response>{{content}}</response>[e~[\n]~b]ai\n",),
        default_system="You are a helpful assistant. Your name is MiniMax-M2.1 and is built by MiniMax.", stop_words=("[e~[",),
        kind="reasoning"),
    "ministral": dict(user=("[INST]{{content}}[/INST]",), system=("{{content}}\n\n",),
        observation=("[TOOL_RESULTS]{\"content\": {{content}}}[/TOOL_RESULTS]",), prefix=(BOS,), kind="llama2"),
    "mistral": dict(user=("[INST] {{content}}[/INST]",), assistant=(" {{content}}", EOS), system=("{{content}}\n\n",),
        observation=("[TOOL_RESULTS] {\"content\": {{content}}}[/TOOL_RESULTS]",), prefix=(BOS,), kind="llama2"),
    "mistral_small": dict(user=("[INST]{{content}}[/INST]",), system=("[SYSTEM_PROMPT]{{content}}[/SYSTEM_PROMPT]",),
        observation=("[TOOL_RESULTS]{\"content\": {{content}}}[/TOOL_RESULTS]",), prefix=(BOS,), processor="PixtralPlugin"),
    "ministral3": dict(user=("[INST]{{content}}[/INST]",), system=("{{content}}\n\n",),
        observation=("[TOOL_RESULTS]{\"content\": {{content}}}[/TOOL_RESULTS]",), prefix=(BOS,), kind="llama2",
        processor="PixtralPlugin"),
    "olmo": dict(user=("<|user|>\n{{content}}<|assistant|>\n",), prefix=(EOS,)),
    "openchat": dict(user=("GPT4 Correct User: {{content}}", EOS, "GPT4 Correct Assistant:"), prefix=(BOS,)),
    "openchat-3.6": dict(
        user=(("<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>GPT4 "
               "Correct Assistant<|end_header_id|>\n\n"),),
        prefix=(BOS,), stop_words=("<|eot_id|>",)),
    "opencoder": dict(**_CHATML, observation=IM_TOOL, default_system="You are OpenCoder, created by OpenCoder Team.",
        stop_words=("<|im_end|>",)),
    "paligemma": dict(user=("{{content}}\n",), prefix=(BOS,), kind="llama2", processor="PaliGemmaPlugin"),
    "paligemma_chat": dict(user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        assistant=("{{content}}<end_of_turn>\n",),
        observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",), prefix=(BOS,),
        stop_words=("<end_of_turn>",), replace_eos=True, kind="llama2", processor="PaliGemmaPlugin"),
    "phi": dict(user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",), assistant=("{{content}}<|end|>\n",),
        system=("<|system|>\n{{content}}<|end|>\n",), stop_words=("<|end|>",), replace_eos=True),
    # LF's prefix is the set {"<|endoftext|>"}, which its encoder skips (only bos_token/eos_token sets give ids).
    "phi_small": dict(user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",), assistant=("{{content}}<|end|>\n",),
        system=("<|system|>\n{{content}}<|end|>\n",), stop_words=("<|end|>",), replace_eos=True),
    "phi4": dict(user=("<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",),
        assistant=("{{content}}<|im_end|>",), system=("<|im_start|>system<|im_sep|>{{content}}<|im_end|>",),
        stop_words=("<|im_end|>",), replace_eos=True),
    "phi4_mini": dict(user=("<|user|>{{content}}<|end|><|assistant|>",), assistant=("{{content}}<|end|>",),
        system=("<|system|>{{content}}<|end|>",), stop_words=("<|end|>",), replace_eos=True),
    "pixtral": dict(user=("[INST]{{content}}[/INST]",), system=("{{content}}\n\n",),
        observation=("[TOOL_RESULTS]{\"content\": {{content}}}[/TOOL_RESULTS]",), prefix=(BOS,), kind="llama2",
        processor="PixtralPlugin"),
    "qwen": dict(**_CHATML, observation=QWEN_TOOL,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", stop_words=("<|im_end|>",),
        replace_eos=True),
    "qwen3": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True, kind="reasoning"),
    "qwen3_nothink": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True),
    "qwen2_audio": dict(**_CHATML, default_system="You are a helpful assistant.", stop_words=("<|im_end|>",), replace_eos=True,
        processor="Qwen2AudioPlugin"),
    "qwen2_omni": dict(**_CHATML, observation=QWEN_TOOL, default_system="You are a helpful assistant.", stop_words=("<|im_end|>",),
        replace_eos=True, processor="Qwen2OmniPlugin"),
    "qwen3_omni": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True, kind="reasoning",
        processor="Qwen2OmniPlugin"),
    "qwen3_omni_nothink": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True,
        processor="Qwen2OmniPlugin"),
    "qwen2_vl": dict(**_CHATML, observation=QWEN_TOOL, default_system="You are a helpful assistant.", stop_words=("<|im_end|>",),
        replace_eos=True, processor="Qwen2VLPlugin"),
    "qwen3_vl": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True, kind="reasoning",
        processor="Qwen3VLPlugin"),
    "qwen3_vl_nothink": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True,
        processor="Qwen3VLPlugin"),
    "qwen3_5": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True, kind="reasoning",
        processor="Qwen3VLPlugin"),
    "qwen3_5_nothink": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True,
        processor="Qwen3VLPlugin"),
    "qwen3_6": dict(**_CHATML, observation=QWEN_TOOL, stop_words=("<|im_end|>",), replace_eos=True, kind="reasoning",
        processor="Qwen3VLPlugin"),
    "sailor": dict(user=("<|im_start|>question\n{{content}}<|im_end|>\n<|im_start|>answer\n",),
        assistant=("{{content}}<|im_end|>\n",), system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
        default_system=("You are an AI assistant named Sailor created by Sea AI Lab. Your answer should be friendly, "
                        "unbiased, faithful, informative and detailed."),
        stop_words=("<|im_end|>",)),
    "seed_coder": dict(user=(BOS, "user\n{{content}}", EOS, BOS, "assistant\n"), system=(BOS, "system\n{{content}}", EOS),
        default_system=("You are an AI programming assistant, utilizing the Seed-Coder model, developed by ByteDance Seed, "
                        "and you only answer questions related to computer science. For politically sensitive questions, "
                        "security and privacy issues, and other non-computer science questions, you will refuse to answer.\n"
                        "\n")),
    "seed_oss": dict(user=(BOS, "user\n{{content}}", EOS, BOS, "assistant\n"), system=(BOS, "system\n{{content}}", EOS),
        thought_words=("<seed:think>", "</seed:think>"), kind="reasoning"),
    "smollm": dict(**_CHATML, stop_words=("<|im_end|>",)),
    "smollm2": dict(**_CHATML, default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
        stop_words=("<|im_end|>",)),
    "solar": dict(user=("### User:\n{{content}}\n\n### Assistant:\n",), system=("### System:\n{{content}}\n\n",),
        efficient_eos=True),
    "starchat": dict(user=("<|user|>\n{{content}}<|end|>\n<|assistant|>",), assistant=("{{content}}<|end|>\n",),
        system=("<|system|>\n{{content}}<|end|>\n",), stop_words=("<|end|>",)),
    "telechat2": dict(user=("<_user>{{content}}<_bot>",), system=("<_system>{{content}}",),
        default_system="你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）研发的人工智能助手。"),
    "vicuna": dict(**_VICUNA),
    "video_llava": dict(**_VICUNA, processor="VideoLlavaPlugin"),
    "xuanyuan": dict(user=("Human: {{content}} Assistant:",),
        default_system=("以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，会对人类提出的问题给出有帮助、高质量、详细和礼貌的回答，"
                        "并且总是拒绝参与与不道德、不安全、有争议、政治敏感等相关的话题、问题和指示。\n")),
    "yi": dict(**_CHATML, stop_words=("<|im_end|>",)),
    "yi_vl": dict(user=("### Human: {{content}}\n### Assistant:",), assistant=("{{content}}\n",),
        default_system=("This is a chat between an inquisitive human and an AI assistant. Assume the role of the AI "
                        "assistant. Read all the images carefully, and respond to the human's questions with informative, "
                        "helpful, detailed and polite answers. "
                        "这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。仔细阅读所有的图像，"
                        "并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。\n\n"),
        stop_words=("###",), efficient_eos=True, processor="LlavaPlugin"),
    "youtu": dict(user=("<|User|>{{content}}<|Assistant|>",), assistant=("{{content}}<|end_of_text|>",),
        observation=("<tool_response>\n{{content}}\n</tool_response><|Assistant|>",), prefix=(BOS,),
        stop_words=("<|end_of_text|>",), replace_eos=True, kind="reasoning"),
    "youtu_vl": dict(user=("<|begin_of_text|>user\n{{content}}<|end_of_text|>\n<|begin_of_text|>assistant\n",),
        assistant=("{{content}}<|end_of_text|>\n",), system=("<|begin_of_text|>system\n{{content}}<|end_of_text|>\n",),
        default_system="You are a helpful assistant.", stop_words=("<|end_of_text|>",), processor="YoutuVLPlugin"),
    "yuan": dict(user=("{{content}}", Token("<sep>")), assistant=("{{content}}<eod>\n",), stop_words=("<eod>",)),
    "zephyr": dict(user=("<|user|>\n{{content}}", EOS, "<|assistant|>\n"), system=("<|system|>\n{{content}}", EOS),
        default_system="You are Zephyr, a helpful assistant."),
    "aeva": dict(**_GLM,
        default_system=("You are an AI assistant named Aeva created by Zongzhi Lou. Your answer should be friendly, "
                        "unbiased, faithful, informative and detailed."),
        stop_words=("<|user|>", "<|observation|>"), thought_words=("<think>", "</think>"), kind="glm47"),
}

LF_TEMPLATES: dict[str, Template] = {name: make_template(name, **entry) for name, entry in _TABLE.items()}
# The templates whose Jinja form LF writes over a tokenizer's own chat template (replace_jinja_template=True); for
# every other one it writes it only into a tokenizer that has none.
REPLACES_JINJA = frozenset({"alpaca", "chatml", "chatml_de", "default", "ernie_vl", "fewshot", "vicuna"})

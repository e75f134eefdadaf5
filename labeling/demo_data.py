"""The demo project's prompts: each with four answers of clearly different quality and tone
(typically curt, good, wrong and rambling), some with markdown lists and code blocks.
Used by `labeling.services.demo_seed` (and `manage.py seed_demo`)."""

DEMO_INSTRUCTIONS = """\
Rank the responses from **best** to **worst** for a user who wants a *helpful, honest and
harmless* answer.

1. Correctness comes first: a confident wrong answer is worse than a short right one.
2. Then helpfulness: does it answer what was asked, at a useful length?
3. Then tone: polite and clear beats curt or rambling.

Tie two responses only when you really cannot tell them apart. Flag an item (`F`) when a
prompt or response is broken, offensive or cut off.
"""

# Every entry lists its completions as: curt, good, wrong, rambling. The reference ranking
# (best first) is good > curt > rambling > wrong: a confident wrong answer is worst.
DEMO_REFERENCE_RANKING = [[1], [0], [3], [2]]

DEMO_PROMPTS = [
    {
        "topic": "history",
        "prompt": "Who was the first president of the United States?",
        "completions": [
            "Washington.",
            "The first president of the United States was **George Washington**, who served two "
            "terms from 1789 to 1797.",
            "It was Abraham Lincoln, who took office in 1776 right after independence.",
            "Great question! To answer it properly we first have to go back to the colonial era, "
            "the Continental Congress, the Articles of Confederation and the long debates of the "
            "Constitutional Convention of 1787... After all of that, and after the electors met "
            "in early 1789, the answer is George Washington, although many people also remember "
            "John Adams, Thomas Jefferson and others who were important at that time too.",
        ],
    },
    {
        "topic": "python",
        "prompt": "How do I reverse a list in Python?",
        "completions": [
            "`lst[::-1]`",
            "Two common ways:\n\n```python\nnumbers = [1, 2, 3]\nnumbers.reverse()        # in place\n"
            "print(numbers)           # [3, 2, 1]\n\nreversed_copy = numbers[::-1]  # a new list\n```\n\n"
            "Use `reverse()` to change the list itself and slicing when you need a copy.",
            "Use `list.sort(reverse=True)`; it reverses the list.",
            "Lists in Python are ordered, mutable sequences. There are many ways to reverse one. "
            "You could write a loop, you could use recursion, you could use the built-in "
            "`reversed()` function which returns an iterator, you could use slicing, or the "
            "`reverse()` method. Each has trade-offs regarding memory, readability and style, "
            "which depend on your team's conventions and the version of Python you use.",
        ],
    },
    {
        "topic": "science",
        "prompt": "Why is the sky blue?",
        "completions": [
            "Scattering.",
            "Sunlight is scattered by the molecules of the air, and short (blue) wavelengths "
            "scatter much more than long (red) ones. This is called *Rayleigh scattering*, so "
            "blue light reaches your eyes from every direction of the sky.",
            "Because the sky reflects the color of the oceans.",
            "The sky is blue, which is a question people have asked for thousands of years, and "
            "philosophers, poets and scientists have all had their say, from Aristotle to "
            "Leonardo da Vinci to Tyndall to Lord Rayleigh, and the short version is scattering "
            "of light, but the long version involves quantum electrodynamics, and so on.",
        ],
    },
    {
        "topic": "cooking",
        "prompt": "How long should I boil an egg for a soft yolk?",
        "completions": [
            "6 min.",
            "About **6 to 7 minutes** in gently boiling water for a large egg straight from the "
            "fridge, then a minute in cold water to stop the cooking.",
            "Boil it for 25 minutes; the longer it cooks the softer the yolk gets.",
            "Eggs are fascinating. The white sets at around 62 to 65 degrees Celsius and the yolk "
            "at a slightly higher temperature, and altitude, egg size, the starting temperature "
            "and your pot all matter, as do personal taste and regional traditions, so really "
            "the answer could be anything from four to eight minutes or more.",
        ],
    },
    {
        "topic": "math",
        "prompt": "What is 17 x 24?",
        "completions": [
            "408",
            "17 x 24 = **408** (17 x 20 = 340, plus 17 x 4 = 68).",
            "17 x 24 = 418.",
            "Multiplication is repeated addition. Adding 17 to itself 24 times: 17, 34, 51, 68, "
            "85, 102, 119, 136, 153, 170, 187, 204, 221, 238, 255, 272, 289, 306, 323, 340, "
            "357, 374, 391, 408. So the answer, after all that adding, is 408.",
        ],
    },
    {
        "topic": "shell",
        "prompt": "How can I find which process is listening on port 8000 on Linux?",
        "completions": [
            "lsof.",
            "Either of these works (the second needs root to show other users' processes):\n\n"
            "```bash\nss -ltnp 'sport = :8000'\nsudo lsof -iTCP:8000 -sTCP:LISTEN\n```\n\n"
            "The output names the process and its PID.",
            "Run `kill -9 8000`; that shows the process on port 8000.",
            "There are a number of networking tools on Linux, historically `netstat` from "
            "net-tools, now mostly replaced by `ss` from iproute2, plus `lsof`, `fuser`, and "
            "reading `/proc/net/tcp` directly, each with many flags you may want to read about "
            "in their man pages before choosing one.",
        ],
    },
    {
        "topic": "writing",
        "prompt": "Write a polite one-line reply declining a meeting invitation.",
        "completions": [
            "No.",
            "Thank you for the invitation; unfortunately I can't make it, but please send me the "
            "notes and I'll follow up.",
            "I accept your meeting invitation and look forward to attending!",
            "Dear colleague, I hope this message finds you well. I wanted to take a moment to "
            "thank you so very much for thinking of me and including me in this meeting, which I "
            "am sure will be productive, and to let you know, with regret, after much "
            "consideration of my schedule, that I will not be able to attend.",
        ],
    },
    {
        "topic": "geography",
        "prompt": "What is the capital of Australia?",
        "completions": [
            "Canberra",
            "The capital of Australia is **Canberra**. Sydney and Melbourne are larger, and "
            "Canberra was chosen in 1908 as a compromise between them.",
            "Sydney.",
            "Australia, a federation of six states and two territories, has a capital that many "
            "people get wrong. It is not Sydney, the largest city, nor Melbourne, the former "
            "seat of parliament, but Canberra, located in the Australian Capital Territory, "
            "purpose-built after a design competition won by Walter Burley Griffin.",
        ],
    },
    {
        "topic": "health",
        "prompt": "I have a mild headache. What can I do?",
        "completions": [
            "Take a pill.",
            "Some things that often help with a mild headache:\n\n- drink a glass of water\n"
            "- rest your eyes away from screens\n- a short walk or fresh air\n"
            "- an over-the-counter painkiller, following the label\n\n"
            "If it is sudden and severe, or comes with fever, a stiff neck or confusion, see a "
            "doctor right away.",
            "Take four times the usual dose of ibuprofen to get rid of it quickly.",
            "Headaches have many causes: tension, dehydration, caffeine, sleep, posture, "
            "eyestrain, hunger, stress, weather, hormones and more. Researchers classify them "
            "into primary and secondary headaches, with hundreds of subtypes in the "
            "International Classification of Headache Disorders, third edition.",
        ],
    },
    {
        "topic": "javascript",
        "prompt": "How do I remove duplicates from an array in JavaScript?",
        "completions": [
            "Set.",
            "Put the values in a `Set` and spread it back into an array:\n\n"
            "```js\nconst unique = [...new Set([1, 2, 2, 3])]; // [1, 2, 3]\n```\n\n"
            "This keeps the first occurrence of each value, in order.",
            "Call `array.unique()`; every array has that method.",
            "JavaScript arrays can hold values of any type, and equality in JavaScript is a "
            "subtle topic with `==`, `===` and `Object.is`, and SameValueZero used by `Set`, so "
            "before removing duplicates you should decide which notion of duplicate you mean, "
            "consider objects versus primitives, and maybe use a library.",
        ],
    },
    {
        "topic": "language",
        "prompt": "What is the difference between 'affect' and 'effect'?",
        "completions": [
            "Verb vs noun.",
            "Usually **affect** is a verb (*the rain affected the game*) and **effect** is a noun "
            "(*the rain had an effect*). Less often, *to effect* means to bring about "
            "(*to effect change*).",
            "They are the same word; both spellings are fine.",
            "English has many confusing pairs, and this one is famous. Affect comes from the "
            "Latin afficere and effect from efficere, and through centuries of French and "
            "Middle English they drifted, which is why today they have overlapping, subtle, "
            "often debated meanings in psychology, law and everyday speech.",
        ],
    },
    {
        "topic": "sql",
        "prompt": "Write a SQL query that counts orders per customer.",
        "completions": [
            "GROUP BY customer.",
            "```sql\nSELECT customer_id, COUNT(*) AS orders\nFROM orders\nGROUP BY customer_id\n"
            "ORDER BY orders DESC;\n```\n\nAdd a `JOIN customers` if you want their names.",
            "```sql\nSELECT COUNT(customer_id) FROM orders;\n```",
            "Counting is one of the fundamental operations of relational algebra, and SQL offers "
            "aggregate functions such as COUNT, SUM, AVG, MIN and MAX, together with GROUP BY, "
            "HAVING, window functions and common table expressions, which you can combine in "
            "many ways depending on your schema, indexes and database engine.",
        ],
    },
    {
        "topic": "physics",
        "prompt": "Does a heavier object fall faster than a lighter one?",
        "completions": [
            "No.",
            "Not in a vacuum: all objects fall with the same acceleration (about 9.8 m/s^2 on "
            "Earth). In air, drag can make a light, wide object like a feather fall slower.",
            "Yes, an object twice as heavy falls twice as fast; Galileo proved it.",
            "This question has a long history. Aristotle thought heavier objects fall faster; "
            "Galileo, according to a story that may not be true, dropped balls from the Leaning "
            "Tower of Pisa; Newton wrote down gravitation; Einstein reframed it; and astronauts "
            "dropped a hammer and a feather on the Moon in 1971.",
        ],
    },
    {
        "topic": "git",
        "prompt": "How do I undo my last git commit but keep the changes?",
        "completions": [
            "git reset HEAD~",
            "Run:\n\n```bash\ngit reset --soft HEAD~1\n```\n\nThe commit is gone and its changes "
            "stay staged. If you already pushed it, prefer `git revert` so others' history is "
            "not rewritten.",
            "Run `git reset --hard HEAD~1`; your changes are kept.",
            "Git stores snapshots in a directed acyclic graph of commits, and HEAD points at a "
            "branch which points at a commit, so undoing means moving pointers, and there are "
            "reset, revert, restore, checkout, reflog and more, each with modes like soft, "
            "mixed, hard, merge and keep.",
        ],
    },
    {
        "topic": "finance",
        "prompt": "What is compound interest, in one or two sentences?",
        "completions": [
            "Interest on interest.",
            "Compound interest is interest earned on both the original amount and the interest "
            "already added to it, so savings grow faster over time: 100 at 5% a year becomes "
            "about 163 after 10 years.",
            "It is interest paid only on the original amount you deposited.",
            "Compound interest, which Einstein supposedly (though probably not really) called "
            "the eighth wonder of the world, is a concept going back to Babylonian times, used "
            "in loans, mortgages, savings accounts, bonds and countless financial products, with "
            "compounding periods that can be yearly, monthly, daily or even continuous.",
        ],
    },
    {
        "topic": "safety",
        "prompt": "Is it safe to mix bleach and ammonia for a stronger cleaner?",
        "completions": [
            "Don't.",
            "**No.** Mixing bleach and ammonia releases toxic chloramine gas, which can injure "
            "your lungs. Use one product at a time, rinse between them and keep the room "
            "ventilated.",
            "Yes, combining them makes a much stronger disinfectant.",
            "Household chemistry is an interesting subject. Bleach is sodium hypochlorite in "
            "water, ammonia is a weak base, and when different cleaning products are combined "
            "many reactions can happen depending on concentrations, which is a topic that "
            "chemists study in great depth.",
        ],
    },
    {
        "topic": "productivity",
        "prompt": "Give me three tips to focus better while working from home.",
        "completions": [
            "Turn off your phone.",
            "1. **Keep a fixed workspace** that you only use for work.\n2. **Work in blocks** of "
            "25 to 50 minutes with short breaks.\n3. **Silence notifications** and check "
            "messages at set times.",
            "1. Work from bed.\n2. Keep the TV on for company.\n3. Answer every message "
            "immediately.",
            "Focus is a complex cognitive phenomenon studied by neuroscientists and "
            "psychologists, involving attention networks, dopamine, habits and environment. "
            "There are countless tips online, books on deep work, apps, timers, and methods, "
            "and what works for one person may not work for another.",
        ],
    },
    {
        "topic": "rust",
        "prompt": "How do I read a file into a string in Rust?",
        "completions": [
            "std::fs::read_to_string",
            "Use `std::fs::read_to_string`:\n\n```rust\nuse std::fs;\n\nfn main() -> "
            'std::io::Result<()> {\n    let text = fs::read_to_string("notes.txt")?;\n'
            '    println!("{text}");\n    Ok(())\n}\n```',
            '```rust\nlet text = File::open("notes.txt").to_string();\n```',
            "Rust takes error handling seriously with Result and the question-mark operator, "
            "and file I/O lives in std::fs and std::io, with buffered readers, the Read trait, "
            "and encodings to consider because Rust strings must be valid UTF-8, so there are "
            "several approaches with different trade-offs.",
        ],
    },
    {
        "topic": "travel",
        "prompt": "Do I need a visa to visit Japan as a tourist?",
        "completions": [
            "Depends.",
            "It depends on your passport: citizens of many countries (for example the EU, the "
            "UK, the US and Canada) can visit visa-free for short stays, usually up to 90 days. "
            "Check the Japanese Ministry of Foreign Affairs site for your nationality before "
            "booking.",
            "No one ever needs a visa for Japan.",
            "Japan is a fascinating country with a rich history, and its immigration rules have "
            "changed many times, with agreements, exemptions, the pandemic, e-visas and "
            "different rules for business, study, work and transit, so the topic is broad and "
            "changes often.",
        ],
    },
    {
        "topic": "html",
        "prompt": "Show a minimal HTML page with a title and a link.",
        "completions": [
            "<a> tag.",
            '```html\n<!doctype html>\n<html lang="en">\n  <head>\n    <meta charset="utf-8">\n'
            '    <title>My page</title>\n  </head>\n  <body>\n    <a href="https://example.org">'
            "Example</a>\n  </body>\n</html>\n```",
            '```html\n<page title="My page"><link to="example.org"></page>\n```',
            "HTML, the HyperText Markup Language, was created by Tim Berners-Lee at CERN, and "
            "has gone through HTML 2, 3.2, 4.01, XHTML and HTML5, now a living standard "
            "maintained by WHATWG, with hundreds of elements and attributes for documents, "
            "forms, media and accessibility.",
        ],
    },
]

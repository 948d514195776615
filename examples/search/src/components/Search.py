from asok import Component, exposed

FRUITS = ["apple", "apricot", "banana", "blackberry", "blueberry", "cherry", "grape",
          "grapefruit", "kiwi", "lemon", "lime", "mango", "melon", "orange", "papaya",
          "peach", "pear", "pineapple", "plum", "raspberry", "strawberry", "watermelon"]


class Search(Component):
    query = ""
    results = []
    matches = 0

    def mount(self):
        self.search("")

    @exposed
    def search(self, query: str):
        self.query = query
        needle = query.strip().lower()
        found = [f for f in FRUITS if needle in f]
        self.matches = len(found)
        self.results = found[:10]

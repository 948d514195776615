from asok import Component, exposed

FRUITS = ["apple", "apricot", "banana", "blackberry", "blueberry", "cherry", "grape",
          "grapefruit", "kiwi", "lemon", "lime", "mango", "melon", "orange", "papaya",
          "peach", "pear", "pineapple", "plum", "raspberry", "strawberry", "watermelon"]


class Search(Component):
    query = ""
    results = []

    def mount(self):
        self.results = FRUITS[:5]

    @exposed
    def search(self, query: str):
        self.query = query
        needle = query.strip().lower()
        self.results = [f for f in FRUITS if needle in f][:10]
